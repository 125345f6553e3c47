"""Presence pushed by LiveKit's webhooks (``webhooks`` in the configuration).

The session's real LiveKit posts its webhooks to a relay (:class:`realstack.WebhookRelay`) that
passes each one on, byte for byte, to the Envoy under test at ``/sfu_webhook``, from where they
go on to the lk-jwt-service stand-in (which checks them with livekit/protocol's receiver). The
guard reads them on the way: joins and leaves reach a room's view without a ListParticipants
call, a refusal needs none, and a user who leaves frees their place when the event arrives.
"""

from __future__ import annotations

import base64
import concurrent.futures
import hashlib
import hmac
import json
import socket
import time
from typing import Any

import pytest
import requests

from conftest import requires_standins, requires_wasm
from guard import ask, assert_channel_full, counting, poll
from stack import LIVEKIT_KEY, LIVEKIT_SECRET, _b64url, jwt_claims, stats_delta

pytestmark = [requires_wasm, requires_standins]


@pytest.fixture(autouse=True)
def _relay_to_nowhere_after(standins: Any) -> Any:
    """The relay stops posting to this test's Envoy once the test is over."""
    yield
    standins.webhooks.reset()

WEBHOOK_PATH = "/sfu_webhook"


def sign(body: bytes, secret: str = LIVEKIT_SECRET, key: str = LIVEKIT_KEY) -> str:
    """The ``Authorization`` LiveKit puts on a webhook: an HS256 token carrying the body's hash."""
    now = int(time.time())
    claims = {"iss": key, "nbf": now, "exp": now + 300,
              "sha256": base64.b64encode(hashlib.sha256(body).digest()).decode()}
    signed = (_b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode()) + "."
              + _b64url(json.dumps(claims).encode()))
    signature = hmac.new(secret.encode(), signed.encode(), hashlib.sha256).digest()
    return f"{signed}.{_b64url(signature)}"


def participant_event(event: str, room: str, identity: str, joined_at_ms: int) -> bytes:
    """A participant event as LiveKit writes it (protojson: camelCase, int64 as strings)."""
    return json.dumps({"event": event, "room": {"sid": "RM_x", "name": room},
                       "participant": {"sid": "PA_x", "identity": identity, "state": "ACTIVE",
                                       "joinedAtMs": str(joined_at_ms)},
                       "id": "EV_x", "createdAt": str(int(time.time()))}).encode()


def participant_event_of_second(event: str, room: str, identity: str, sid: str,
                                joined_at_s: int) -> bytes:
    """A participant event as a LiveKit without ``joinedAtMs`` writes it: the session's start
    in seconds only (``joinedAt``), and its sid."""
    return json.dumps({"event": event, "room": {"sid": "RM_x", "name": room},
                       "participant": {"sid": sid, "identity": identity, "state": "ACTIVE",
                                       "joinedAt": str(joined_at_s)},
                       "id": f"EV_{sid}_{event}", "createdAt": str(int(time.time()))}).encode()


def post_webhook(envoy: Any, body: bytes, authorization: str, path: str = WEBHOOK_PATH) -> requests.Response:
    return envoy.post(path, body, headers={"Authorization": authorization,
                                           "Content-Type": "application/webhook+json"})


class Call:
    """An Envoy with webhooks read, the relay posting to it, and a limited room."""

    def __init__(self, start_envoy: Any, plugin_config: Any, new_room: Any, livekit: Any,
                 limit: int, path: str = WEBHOOK_PATH, **webhooks: Any):
        self.livekit = livekit
        self.envoy = start_envoy(plugin_config(webhooks={"path": path, **webhooks}))
        self.relay = livekit.webhooks
        self.relay.reset(target=f"{self.envoy.url}{path}")
        self.room = new_room(limit=limit)
        self.alias = ""
        self.identities: dict[str, str] = {}

    def ask(self, who: str) -> requests.Response:
        resp = ask(self.envoy, "/get_token", "new", who, "D1", self.room)
        if resp.status_code == 200:
            claims = jwt_claims(resp.json()["jwt"])
            self.alias = claims["video"]["room"]
            self.identities[who] = claims["sub"]
        return resp

    def events_read(self) -> int:
        """Webhooks the guard took as LiveKit's."""
        stats = self.envoy.stats()
        return stats.get("webhooks_accepted", 0) + stats.get("webhooks_unreadable", 0)

    def join(self, who: str) -> None:
        """``who`` gets a token through the guard and connects; returns once the guard has
        read LiveKit's participant_joined."""
        resp = self.ask(who)
        assert resp.status_code == 200, resp.text
        self.livekit.connect(resp)
        self.wait_for("participant_joined", who)

    def leave(self, who: str) -> None:
        self.livekit.leave(self.alias, self.identities[who])

    def wait_for(self, event: str, who: str, timeout: float = 15) -> None:
        """Until the relay passed on ``event`` of ``who`` and the guard has read it."""
        identity = self.identities[who]

        def passed() -> bool:
            seen = [(e, json.loads(body)) for e, _, body in list(self.relay.seen)]
            return any(e == event and b.get("participant", {}).get("identity") == identity
                       for e, b in seen)
        poll(passed, f"LiveKit's {event} of {who}", timeout)
        # Every webhook passed on so far has been read (a test posts its own on top).
        poll(lambda: self.events_read() >= len(self.relay.seen),
             "the guard to read every webhook passed on", timeout)


def test_joins_and_leaves_are_seen_without_a_list_and_a_leave_frees_the_place(
        start_envoy, plugin_config, new_room, livekit, real_lk_jwt):
    # Counted before the relay is pointed at this Envoy: a late webhook of an earlier test's room
    # (room_finished) may pass through as soon as it is, and is then both relayed and accepted.
    jwt_before = real_lk_jwt.stats()["webhooks"]
    call = Call(start_envoy, plugin_config, new_room, livekit, limit=2)
    with counting(call.envoy, livekit) as cold:
        call.join("alice")
    assert cold.list_participants == 1, "a cold room is listed once"
    with counting(call.envoy, livekit) as warm:
        call.join("bob")
        assert_channel_full(call.ask("carol"))
    assert warm.list_participants == 0
    assert warm.guard["livekit_lookups_avoided"] == 2
    assert warm.guard["blocked"] == 1 and warm.guard["allowed"] == 1
    # Alice leaves: carol gets her place as soon as LiveKit's event is here.
    with counting(call.envoy, livekit) as after:
        start = time.monotonic()
        call.leave("alice")
        resp = poll(lambda: (r := call.ask("carol")).status_code == 200 and r,
                    "carol to get alice's place", 15)
        freed = time.monotonic() - start
    assert resp.status_code == 200
    assert after.list_participants == 0
    print(f"\nplace freed {freed * 1000:.0f} ms after alice's client left (LiveKit's "
          f"participant_left, relayed to the guard)")
    # Every webhook went on to lk-jwt-service unaltered: its own receiver accepted each.
    relayed = len(call.relay.seen)
    poll(lambda: real_lk_jwt.stats()["webhooks"]["accepted"] - jwt_before["accepted"] >= relayed,
         "lk-jwt-service to accept every webhook", 5)
    assert real_lk_jwt.stats()["webhooks"]["refused"] == jwt_before["refused"]
    assert call.envoy.stats()["webhooks_refused"] == 0


def test_a_forged_or_replayed_webhook_changes_nothing(
        start_envoy, plugin_config, new_room, livekit, real_lk_jwt):
    call = Call(start_envoy, plugin_config, new_room, livekit, limit=2)
    call.join("alice")
    call.join("bob")
    jwt_before = real_lk_jwt.stats()["webhooks"]
    # Forged leaves of bob: another secret, no signature, the signature of another body.
    left = participant_event("participant_left", call.alias, call.identities["bob"],
                             int(time.time() * 1000))
    with counting(call.envoy, livekit) as forged:
        for authorization in (sign(left, secret="not the secret of this LiveKit server!"), "",
                              sign(left.replace(b"ACTIVE", b"ACTIVF"))):
            assert post_webhook(call.envoy, left, authorization).status_code == 401
        assert_channel_full(call.ask("carol"))
    assert forged.guard["webhooks_refused"] == 3
    assert forged.list_participants == 0, "the view still verified: refused without a list"
    # lk-jwt-service got them unchanged, and refused them itself.
    assert real_lk_jwt.stats()["webhooks"]["refused"] - jwt_before["refused"] == 3
    # Alice leaves; her participant_joined, replayed (still validly signed), brings nobody back.
    call.leave("alice")
    call.wait_for("participant_left", "alice")
    joined = [(h, b) for e, h, b in call.relay.seen if e == "participant_joined"
              and json.loads(b)["participant"]["identity"] == call.identities["alice"]]
    headers, body = joined[-1]
    with counting(call.envoy, livekit) as replayed:
        assert post_webhook(call.envoy, body, headers["Authorization"]).status_code == 200
        resp = call.ask("carol")
    assert replayed.guard["webhooks_accepted"] == 1
    assert resp.status_code == 200, resp.text
    assert replayed.list_participants == 0


def test_events_out_of_order_leave_a_participant_who_left_gone(
        start_envoy, plugin_config, new_room, livekit):
    call = Call(start_envoy, plugin_config, new_room, livekit, limit=2)
    call.join("alice")
    # Bob joins and leaves while his events are held back; they then arrive newest first.
    call.relay.holding = True
    resp = call.ask("bob")
    assert resp.status_code == 200, resp.text
    livekit.connect(resp)
    poll(lambda: any(e == "participant_joined" for e, _, _ in call.relay.held), "bob's join", 15)
    call.leave("bob")
    poll(lambda: any(e == "participant_left" for e, _, _ in call.relay.held), "bob's leave", 15)
    order = [e for e, _, _ in reversed(call.relay.held)]
    assert order.index("participant_left") < order.index("participant_joined")
    assert all(status == 200 for status in call.relay.release(reverse=True))
    with counting(call.envoy, livekit) as counts:
        resp = call.ask("carol")
    assert resp.status_code == 200, resp.text
    assert counts.list_participants == 0 and counts.guard["livekit_lookups_avoided"] == 1


@pytest.mark.parametrize("leave_first", [True, False])
def test_a_reconnection_within_a_second_keeps_the_participant_in_the_view(
        start_envoy, plugin_config, new_room, livekit, leave_first):
    """A LiveKit that gives a session's start in seconds only (``joinedAt``): dave drops and
    reconnects within one second, and LiveKit posts his leave and his new session's join (in
    either order). The new session is told from the one that ended by its sid: dave stays in
    the room's view, and carol is refused on it, without a list."""
    call = Call(start_envoy, plugin_config, new_room, livekit, limit=2)
    call.join("alice")
    second = int(time.time())
    dave = "@dave:test.local:D1"
    events = [("participant_joined", "PA_dave1"), ("participant_left", "PA_dave1"),
              ("participant_joined", "PA_dave2")]
    if not leave_first:
        events[1], events[2] = events[2], events[1]
    with counting(call.envoy, livekit) as counts:
        for event, sid in events:
            body = participant_event_of_second(event, call.alias, dave, sid, second)
            assert post_webhook(call.envoy, body, sign(body)).status_code == 200
        assert_channel_full(call.ask("carol"))
    assert counts.guard["webhooks_accepted"] >= 3
    assert counts.list_participants == 0 and counts.guard["livekit_lookups_avoided"] == 1


def test_a_participant_whose_events_were_lost_is_counted_once_the_view_is_verified_again(
        start_envoy, plugin_config, new_room, livekit):
    call = Call(start_envoy, plugin_config, new_room, livekit, limit=2, verify_seconds=1)
    call.join("alice")
    # Mallory connects with a token the guard never saw, and LiveKit's events are lost.
    call.relay.dropping = True
    livekit.set_room(call.alias, [(call.identities["alice"], "ACTIVE"), ("@mallory:elsewhere:M", "ACTIVE")])
    time.sleep(1.1)  # past webhooks.verify_seconds: the view must be listed again
    with counting(call.envoy, livekit) as counts:
        assert_channel_full(call.ask("carol"))
    assert counts.list_participants == 1


def test_a_webhook_flood_costs_bounded_work(start_envoy, plugin_config, new_room, livekit):
    call = Call(start_envoy, plugin_config, new_room, livekit, limit=2)
    call.join("alice")
    before = call.envoy.stats()
    lists_before = livekit.livekit_stats()["list_participants_calls"]
    relayed_before = len(call.relay.seen)

    def forged(n: int) -> int:
        body = participant_event("participant_left", call.alias, call.identities["alice"], n)
        return post_webhook(call.envoy, body, sign(body, secret="x" * 40)).status_code

    def other_rooms(n: int) -> int:
        body = participant_event("participant_joined", f"room-{n}", f"who-{n}", n)
        return post_webhook(call.envoy, body, sign(body)).status_code

    def into_the_room(n: int) -> int:
        body = participant_event("participant_joined", call.alias, f"ghost-{n}", n + 1)
        return post_webhook(call.envoy, body, sign(body)).status_code

    start = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(forged, range(1000)))
        entries_before = call.envoy.stats().get("shared_data_entries", 0)
        statuses += list(pool.map(other_rooms, range(1000)))
        entries_after = call.envoy.stats().get("shared_data_entries", 0)
        statuses += list(pool.map(into_the_room, range(1000)))
    took = time.monotonic() - start
    delta = stats_delta(before, call.envoy.stats())
    relayed = len(call.relay.seen) - relayed_before  # LiveKit's own, meanwhile
    assert delta["webhooks_received"] == 3000 + relayed
    assert delta["webhooks_refused"] == 1000 and delta["webhooks_accepted"] == 2000 + relayed
    assert statuses.count(401) == 1000, "lk-jwt-service refused the forged ones itself"
    # Events of rooms the guard keeps nothing of leave nothing in shared data.
    assert entries_after == entries_before
    # A thousand participants pushed into one room: its record stays within its budget (its
    # view is dropped), and its next decision asks LiveKit, whose list does not show them.
    assert livekit.livekit_stats()["list_participants_calls"] == lists_before
    with counting(call.envoy, livekit) as counts:
        resp = call.ask("bob")
    assert resp.status_code == 200, resp.text
    assert counts.list_participants == 1
    print(f"\n3000 webhooks through Envoy in {took:.2f} s (8 clients)")


def test_the_guard_answers_webhooks_itself_when_configured(
        start_envoy, plugin_config, new_room, livekit, real_lk_jwt):
    path = "/voice-limit-guard/livekit"
    jwt_before = real_lk_jwt.stats()["webhooks"]
    call = Call(start_envoy, plugin_config, new_room, livekit, limit=1, path=path, answer=True)
    call.join("alice")
    with counting(call.envoy, livekit) as counts:
        assert_channel_full(call.ask("bob"))
    assert counts.list_participants == 0
    body = participant_event("participant_left", call.alias, call.identities["alice"], 1)
    assert post_webhook(call.envoy, body, "forged", path=path).status_code == 401
    # Nothing reached lk-jwt-service.
    assert real_lk_jwt.stats()["webhooks"] == jwt_before


def test_the_guard_answers_a_webhook_whose_headers_reached_lk_jwt_service_first(
        start_envoy, plugin_config):
    """With ``answer``, a webhook's headers still go upstream (holding them would stall hosts
    without ``allow_on_headers_stop_iteration``). lk-jwt-service reads a body before it
    answers, even on a path it does not serve, so the guard reads the event and answers."""
    path = "/voice-limit-guard/livekit"
    # No relay posts LiveKit's own webhooks to this Envoy: the one below is the only one.
    envoy = start_envoy(plugin_config(webhooks={"path": path, "answer": True}))
    body = participant_event("participant_left", "!nowhere", "@nobody:test.local:D1", 1)
    with socket.create_connection(("127.0.0.1", envoy.port), timeout=10) as conn:
        conn.sendall(webhook_head(path, body))
        poll(lambda: upstream_requests_active(envoy) == 1, "the headers to reach lk-jwt-service", 10)
        conn.sendall(body)
        answer = conn.recv(4096)
    assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
    assert b"content-length: 0" in answer.lower()
    stats = envoy.stats()
    assert stats["webhooks_accepted"] == 1 and stats["webhooks_unreadable"] == 0


def test_a_webhook_answered_upstream_before_its_body_puts_views_in_doubt(
        start_envoy, plugin_config, fault_server):
    """An upstream answering on the headers alone (lk-jwt-service does not; a misrouted path
    might) ends what Envoy passes through the filter: the guard never reads that event, so it
    counts the webhook unreadable and trusts no view until LiveKit lists it again."""
    upstream = fault_server("early", body={"from": "the upstream"})
    envoy = start_envoy(plugin_config(webhooks={"path": WEBHOOK_PATH}), lk_jwt=upstream)
    body = participant_event("participant_left", "!nowhere", "@nobody:test.local:D1", 1)
    with socket.create_connection(("127.0.0.1", envoy.port), timeout=10) as conn:
        conn.sendall(webhook_head(WEBHOOK_PATH, body))
        answer = conn.recv(4096)
        conn.sendall(body)
    assert b"the upstream" in answer, answer[:300]
    stats = envoy.wait_for_stats({"webhooks_received": 1})
    assert stats["webhooks_unreadable"] == 1 and stats["webhooks_accepted"] == 0


def webhook_head(path: str, body: bytes) -> bytes:
    """The request line and headers of a webhook LiveKit signed for ``body``, sent on their
    own so that the body can follow later."""
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: {sign(body)}\r\n"
            f"Content-Type: application/webhook+json\r\nContent-Length: {len(body)}\r\n\r\n").encode()


def upstream_requests_active(envoy: Any) -> int:
    """Requests Envoy has open to lk-jwt-service (the cluster every path leads to)."""
    resp = requests.get(f"{envoy.admin_url}/stats", timeout=5, params={
        "filter": r"^cluster\.lk_jwt\.upstream_rq_active$", "format": "json"})
    resp.raise_for_status()
    return sum(int(s.get("value", 0)) for s in resp.json().get("stats", []))


def test_until_webhooks_arrive_every_decision_asks_livekit(
        start_envoy, plugin_config, new_room, livekit):
    """`webhooks` configured, but LiveKit's webhooks do not reach this Envoy: the guard decides
    as without them (a list for every refusal), never on a view nothing keeps up to date."""
    envoy = start_envoy(plugin_config(webhooks={}))
    room = new_room(limit=1)
    resp = ask(envoy, "/get_token", "new", "alice", "D1", room)
    assert resp.status_code == 200, resp.text
    livekit.connect(resp)
    alias = jwt_claims(resp.json()["jwt"])["video"]["room"]
    poll(lambda: livekit.list_participants(alias), "alice in LiveKit", 15)
    with counting(envoy, livekit) as counts:
        for _ in range(3):
            assert_channel_full(ask(envoy, "/get_token", "new", "bob", "D1", room))
    assert counts.list_participants == 3
    assert "livekit_lookups_avoided" not in counts.guard
