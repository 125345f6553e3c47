#!/usr/bin/env python3
"""Join latency as users feel it: from the token request to a participant connected to LiveKit,
with and without the guard, on the real stack (`make bench` runs it after bench.py).

Real Synapse, the real LiveKit server, the lk-jwt-service stand-in (which checks each OpenID
token with Synapse, as lk-jwt-service does) and real clients (the LiveKit Go SDK). Two Envoys
front the same lk-jwt-service: plain Envoy, and Envoy with the filter (the test suite's
configuration: limit cached 10 s, LiveKit asked for every token). Each join is a new user in a
room limited to 1,000, so every token is let in; joins alternate between the two Envoys, each
client leaving before the next join. The first join of each Envoy (a cold limit cache) is
reported apart. Overrides: ``JOIN_ROUNDS`` (default 40 joins per Envoy).

Last, with LiveKit's webhooks (``webhooks`` in the configuration, LiveKit posting to the
Envoy): in a room limited to 1, how long after a participant's client leaves the next user's
token is let through (``FREED_ROUNDS``, default 10), each refusal meanwhile decided on the
room's view.

Then the same through Synapse, as current clients ask (MSC4195's client-server get_token,
forwarded by Synapse to lk-jwt-service as its application service): Synapse's proxy URL is one
port, so the two Envoys take turns on it, in blocks of ``BLOCK`` joins, each user joined to the
room beforehand. The guard decides these before lk-jwt-service sees the request.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
import urllib.parse
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "e2e"))

import stack  # noqa: E402
from realstack import LiveKitClients, LiveKitServer, LkJwtService, missing_binaries  # noqa: E402
from stack import (  # noqa: E402
    LIVEKIT_SECRET,
    free_port,
    SERVER_NAME,
    AppService,
    Envoy,
    Synapse,
    default_plugin_config,
    http,
    join_body,
)

ROUNDS = int(os.environ.get("JOIN_ROUNDS", "40"))
FREED_ROUNDS = int(os.environ.get("FREED_ROUNDS", "10"))
BLOCK = 10
RESULTS = REPO / "bench" / "join-latency.md"


def join_once(envoy: Envoy, clients: LiveKitClients, body: dict) -> tuple[float, float]:
    """One join: (token answered, client connected) in ms from the request's start."""
    started = time.perf_counter()
    resp = http().post(f"{envoy.url}/sfu/get", json=body, timeout=30)
    token_at = time.perf_counter()
    if resp.status_code != 200:
        raise RuntimeError(f"join refused: {resp.status_code} {resp.text[:200]}")
    handle = clients.join(resp)
    connected_at = time.perf_counter()
    clients.leave(handle)
    return (token_at - started) * 1000, (connected_at - started) * 1000


def join_through_synapse(synapse: Synapse, token: str, room: str, livekit_url: str,
                         clients: LiveKitClients) -> tuple[float, float]:
    """One join as current clients make it: the token from Synapse's client-server route."""
    started = time.perf_counter()
    resp = synapse.rtc_token(token, room, "bench-member", livekit_url)
    token_at = time.perf_counter()
    if resp.status_code != 200:
        raise RuntimeError(f"join refused: {resp.status_code} {resp.text[:200]}")
    handle = clients.join({"url": livekit_url, "jwt": resp.json()["jwt"]})
    connected_at = time.perf_counter()
    clients.leave(handle)
    return (token_at - started) * 1000, (connected_at - started) * 1000


def account(synapse: Synapse, user_id: str, room: str) -> str:
    """A user of ``synapse`` joined to ``room``; returns its access token."""
    quoted = urllib.parse.quote(user_id, safe="")
    for method, path, body in (("PUT", f"/_synapse/admin/v2/users/{quoted}", {"password": "x-bench"}),
                               ("POST", f"/_synapse/admin/v1/users/{quoted}/login", {})):
        resp = synapse.request(method, path, synapse.admin_token, json=body)
        if resp.status_code not in (200, 201):
            raise RuntimeError(f"account {user_id}: {resp.status_code} {resp.text[:200]}")
    token = resp.json()["access_token"]
    synapse.join_room(room, token)
    return token


def through_synapse(synapse: Synapse, lk_jwt: LkJwtService, livekit: LiveKitServer,
                    clients: LiveKitClients, config: dict, room: str) -> tuple[dict, dict]:
    """Joins through Synapse's proxy, plain Envoy and Envoy + guard taking turns at its port."""
    names = ("plain Envoy", "Envoy + guard")
    tokens = {name: [account(synapse, f"@rtc{i:03d}-{n}:{SERVER_NAME}", room) for i in range(ROUNDS + 1)]
              for n, name in enumerate(names)}
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    cold: dict[str, tuple[float, float]] = {}
    done = {name: 0 for name in names}
    while any(count <= ROUNDS for count in done.values()):
        for name in names:
            envoy = Envoy(lk_jwt=lk_jwt.address, synapse=synapse, livekit=livekit.address,
                          with_filter=name != "plain Envoy", plugin_config=config,
                          listen_port=synapse.proxy_port, name="bench-envoy-proxy").start()
            try:
                for _ in range(BLOCK):
                    i = done[name]
                    if i > ROUNDS:
                        break
                    result = join_through_synapse(synapse, tokens[name][i], room, livekit.ws_url, clients)
                    if i == 0:
                        cold[name] = result
                    else:
                        samples[name].append(result)
                    done[name] += 1
            finally:
                envoy.stop()
    return samples, cold


def place_freed(synapse: Synapse, lk_jwt: LkJwtService, livekit: LiveKitServer,
                clients: LiveKitClients, port: int) -> str:
    """In a room limited to 1, one user after another: each joins, and once the guard has read
    LiveKit's participant_joined, leaves; the next user asks for a token until it is let
    through. The time from the leave to that token, over ``FREED_ROUNDS`` leaves."""
    config = default_plugin_config(synapse.admin_token, LIVEKIT_SECRET, webhooks={})
    envoy = Envoy(lk_jwt=lk_jwt.address, synapse=synapse, livekit=livekit.address,
                  plugin_config=config, name="bench-envoy-webhooks", stop_iteration=False,
                  listen_port=port).start()
    try:
        room = synapse.create_room("bench-freed")
        synapse.set_limit(room, 1)
        bodies = [join_body(f"@freed{i:03d}:{SERVER_NAME}", "D", room) for i in range(FREED_ROUNDS + 1)]
        freed: list[float] = []
        refused = 0
        resp = http().post(f"{envoy.url}/sfu/get", json=bodies[0], timeout=30)
        handle = clients.join(resp)
        for body in bodies[1:]:
            accepted = envoy.stats().get("webhooks_accepted", 0)
            deadline = time.monotonic() + 15
            # Until the guard has read the join (and anything LiveKit sent before it).
            while envoy.stats().get("webhooks_accepted", 0) <= accepted and time.monotonic() < deadline:
                time.sleep(0.02)
            left = time.perf_counter()
            clients.leave(handle)
            while True:
                resp = http().post(f"{envoy.url}/sfu/get", json=body, timeout=30)
                if resp.status_code == 200 or time.perf_counter() - left > 30:
                    break
                refused += 1
            freed.append((time.perf_counter() - left) * 1000)
            if resp.status_code != 200:
                raise RuntimeError(f"place not freed: {resp.status_code} {resp.text[:200]}")
            handle = clients.join(resp)
        clients.leave(handle)
        stats = envoy.stats()
    finally:
        envoy.stop()
    return (f"With LiveKit's webhooks (`webhooks`), a room limited to 1: a participant's place is "
            f"free {statistics.median(freed):.0f} ms after their client leaves (median of {len(freed)}; "
            f"p90 {percentile(freed, 0.9):.0f} ms, max {max(freed):.0f} ms): the client's leave, LiveKit's "
            f"participant_left and the guard reading it. {refused} refusals meanwhile, "
            f"{stats.get('livekit_lookups', 0)} ListParticipants calls for "
            f"{stats.get('token_requests', 0)} token requests "
            f"({stats.get('livekit_lookups_avoided', 0)} decided on the room's view).")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> int:
    missing = missing_binaries()
    if missing:
        print(f"join latency: not built: {', '.join(missing)}", file=sys.stderr)
        return 1
    synapse = Synapse(name="bench-synapse", appservice=AppService()).start()
    parts: list = [synapse]
    try:
        stack.OPENID_PROVIDER = synapse.openid_token
        # LiveKit posts its webhooks to the Envoy of the last part (started then).
        webhook_port = free_port()
        livekit = LiveKitServer(name="bench-livekit",
                                webhook_urls=[f"http://127.0.0.1:{webhook_port}/sfu_webhook"]).start()
        parts.append(livekit)
        lk_jwt = LkJwtService(livekit.ws_url, {SERVER_NAME: synapse.base_url}, name="bench-lk-jwt",
                              appservice=synapse.appservice, server_name=SERVER_NAME,
                              synapse_url=synapse.base_url).start()
        parts.append(lk_jwt)
        clients = LiveKitClients(name="bench-clients").start()
        parts.append(clients)
        config = default_plugin_config(synapse.admin_token, LIVEKIT_SECRET)
        envoys = {
            "plain Envoy": Envoy(lk_jwt=lk_jwt.address, synapse=synapse, livekit=livekit.address,
                                 with_filter=False, name="bench-envoy-plain").start(),
            # The default (decided on the request), without allow_on_headers_stop_iteration.
            "Envoy + guard": Envoy(lk_jwt=lk_jwt.address, synapse=synapse, livekit=livekit.address,
                                   plugin_config=config, name="bench-envoy-guard",
                                   stop_iteration=False).start(),
            "Envoy + guard, decision_phase response": Envoy(
                lk_jwt=lk_jwt.address, synapse=synapse, livekit=livekit.address,
                plugin_config={**config, "decision_phase": "response"},
                name="bench-envoy-guard-response", stop_iteration=True).start(),
        }
        parts.extend(envoys.values())
        room = synapse.create_room("bench")
        synapse.set_limit(room, 1000)
        # Every user's OpenID token is fetched before anything is timed.
        bodies = {name: [join_body(f"@join{i:03d}-{n}:{SERVER_NAME}", "D", room)
                         for i in range(ROUNDS + 1)] for n, name in enumerate(envoys)}
        samples: dict[str, list[tuple[float, float]]] = {name: [] for name in envoys}
        cold: dict[str, tuple[float, float]] = {}
        for i in range(ROUNDS + 1):
            for name, envoy in envoys.items():
                result = join_once(envoy, clients, bodies[name][i])
                if i == 0:
                    cold[name] = result
                else:
                    samples[name].append(result)
        lines = report(samples, cold)
        for envoy in envoys.values():
            envoy.stop()
        rtc_room = synapse.create_room("bench-rtc", preset="public_chat")
        synapse.set_limit(rtc_room, 1000)
        rtc_config = default_plugin_config(synapse.admin_token, LIVEKIT_SECRET,
                                           synapse={"hs_token": synapse.appservice.hs_token})
        rtc_samples, rtc_cold = through_synapse(synapse, lk_jwt, livekit, clients, rtc_config, rtc_room)
        lines += ["", "Through Synapse's client-server get_token (its application-service proxy to the "
                  "Envoy), the guard deciding on the request:", ""]
        lines += report(rtc_samples, rtc_cold)[2:]
        lines += ["", place_freed(synapse, lk_jwt, livekit, clients, webhook_port)]
    finally:
        for part in reversed(parts):
            part.stop()
    text = "\n".join(lines)
    print(text)
    RESULTS.write_text(text + "\n")
    print(f"\n(written to {RESULTS.relative_to(REPO)})")
    return 0


def report(samples: dict[str, list[tuple[float, float]]], cold: dict[str, tuple[float, float]]) -> list[str]:
    floor = statistics.median(c for _, c in samples["plain Envoy"])
    floor_token = statistics.median(t for t, _ in samples["plain Envoy"])
    lines = [
        f"Join latency on the real stack ({ROUNDS} joins per Envoy, {time.strftime('%Y-%m-%d')}, "
        f"load {Path('/proc/loadavg').read_text().split()[0]}): request to connected participant.",
        "",
        "| subject | token p50 ms | ×plain | connected p50 ms | ×plain | connected p90 ms | first join (cold) ms |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, values in samples.items():
        token = statistics.median(t for t, _ in values)
        connected = statistics.median(c for _, c in values)
        lines.append(
            f"| {name} | {token:.1f} | {token / floor_token:.2f} | {connected:.1f} | "
            f"{connected / floor:.2f} | {percentile([c for _, c in values], 0.9):.1f} | "
            f"{cold[name][1]:.1f} |")
    return lines


if __name__ == "__main__":
    sys.exit(main())
