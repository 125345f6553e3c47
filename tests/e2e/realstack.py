"""The real LiveKit server, the Go lk-jwt-service stand-in and real LiveKit clients, on loopback.

- :class:`LiveKitServer`: ``livekit-server`` built from the Go module registry (``make
  livekit``), single node, no Redis, one UDP and one TCP port for media, API key and secret
  from a config file.
- :class:`LkJwtService`: the lk-jwt-service stand-in (``tests/lkstack``, Go): it reads
  requests with Go's ``encoding/json`` and checks OpenID tokens against Synapse's federation
  userinfo endpoint, so test users need real OpenID tokens (:meth:`stack.Synapse.openid_token`).
  Given an :class:`stack.AppService` it also serves the routes Synapse forwards to its
  application service (``rtc/livekit/get_token``), and counts what it did (:meth:`LkJwtService.stats`).
- :class:`LiveKitClients`: real clients (the LiveKit Go SDK) that connect with the tokens the
  guard let through, stay, and leave.

Like :mod:`stack`, no test-framework imports.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import requests

from stack import (
    LIVEKIT_KEY,
    LIVEKIT_SECRET,
    REPO,
    AppService,
    OnLoopback,
    Process,
    StackError,
    free_port,
    http,
    jwt_claims,
    livekit_admin_token,
    run_dir_for,
    sign_hs256,
    signed_by,
    tail,
    wait_until,
)

LIVEKIT_VERSION = "v1.13.5"
LIVEKIT_BIN = Path(os.environ.get("VLG_LIVEKIT", REPO / "target" / "livekit" / LIVEKIT_VERSION / "server"))
LKSTACK_DIR = Path(os.environ.get("VLG_LKSTACK_DIR", REPO / "target" / "lkstack"))


def missing_binaries() -> list[str]:
    """The real-stack binaries not built yet, with the command that builds each."""
    wanted = {LIVEKIT_BIN: "make livekit", LKSTACK_DIR / "lk-jwt-standin": "make lkstack",
              LKSTACK_DIR / "lk-participants": "make lkstack"}
    return [f"{path} ({command})" for path, command in wanted.items() if not path.exists()]


class LiveKitServer(OnLoopback):
    """A real LiveKit server (single node, no Redis) on 127.0.0.1."""

    def __init__(self, key: str = LIVEKIT_KEY, secret: str = LIVEKIT_SECRET,
                 run_dir: str | os.PathLike | None = None, name: str = "livekit", port: int = 0,
                 webhook_urls: list[str] | None = None):
        """``port``: the HTTP/WebSocket port (0: a free one). ``webhook_urls``: where LiveKit
        posts its webhooks, signed with ``key``."""
        self.dir = run_dir_for(name, run_dir)
        self.key = key
        self.secret = secret
        self.webhook_urls = list(webhook_urls or [])
        self.fixed_port = port
        self.port = 0
        self.process: Process | None = None

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> "LiveKitServer":
        if not LIVEKIT_BIN.exists():
            raise StackError(f"LiveKit server not built: {LIVEKIT_BIN} (make livekit)")
        self.port = self.fixed_port or free_port()
        config = {
            "port": self.port,
            "bind_addresses": ["127.0.0.1"],
            "rtc": {"tcp_port": free_port(), "udp_port": free_port(), "node_ip": "127.0.0.1",
                    "use_external_ip": False},
            "keys": {self.key: self.secret},
            "room": {"auto_create": True, "empty_timeout": 60, "departure_timeout": 1},
            "logging": {"level": "info", "json": False},
        }
        if self.webhook_urls:
            config["webhook"] = {"api_key": self.key, "urls": self.webhook_urls}
        path = self.dir / "livekit.yaml"
        path.write_text(json.dumps(config, indent=2))  # JSON is YAML
        self.process = Process("livekit", [LIVEKIT_BIN, "--config", path],
                               self.dir / "livekit.log").start()
        wait_until(lambda: http().get(self.url, timeout=2).status_code == 200,
                   "LiveKit to answer", timeout, self.process)
        return self

    def stop(self) -> None:
        if self.process:
            self.process.stop()

    def list_participants(self, alias: str) -> list[dict]:
        """``ListParticipants`` exactly as the filter asks it (Twirp JSON, an admin token)."""
        resp = http().post(
            f"{self.url}/twirp/livekit.RoomService/ListParticipants", json={"room": alias},
            headers={"Authorization": f"Bearer {livekit_admin_token(self.key, self.secret, alias)}"},
            timeout=10)
        if resp.status_code != 200:
            raise StackError(f"ListParticipants: HTTP {resp.status_code} {resp.text[:300]}")
        return resp.json().get("participants", [])

    def remove_participant(self, alias: str, identity: str) -> None:
        """``RemoveParticipant``: LiveKit forgets the participant at once. For one already gone,
        or going, LiveKit answers 404 ("participant does not exist") or, on a single node, 503
        ("no response from servers"); callers wait for LiveKit's list to show what they asked."""
        resp = http().post(
            f"{self.url}/twirp/livekit.RoomService/RemoveParticipant",
            json={"room": alias, "identity": identity},
            headers={"Authorization": f"Bearer {livekit_admin_token(self.key, self.secret, alias)}"},
            timeout=10)
        if resp.status_code not in (200, 404, 503):
            raise StackError(f"RemoveParticipant: HTTP {resp.status_code} {resp.text[:300]}")

    def delivered(self, event: str, identity: str) -> bool:
        """Whether LiveKit's log shows ``event`` of ``identity`` posted to a webhook URL and
        answered 200. LiveKit writes that line once the answer is back, so whatever read the
        webhook on its way (the guard) has read it."""
        for line in (self.dir / "livekit.log").read_text(errors="replace").splitlines():
            if "sent webhook" not in line or "{" not in line:
                continue
            try:
                fields = json.loads(line[line.index("{"):])
            except ValueError:
                continue
            if (fields.get("event"), fields.get("participant"), fields.get("statusCode")) == \
                    (event, identity, 200):
                return True
        return False

    def states(self, alias: str) -> dict[str, str]:
        """Identity -> state of each participant LiveKit lists in the room."""
        return {p["identity"]: p.get("state", "JOINING") for p in self.list_participants(alias)}


class LkJwtService(OnLoopback):
    """The Go lk-jwt-service stand-in, in front of a real LiveKit and a real Synapse."""

    BINARY = "lk-jwt-standin"

    def __init__(self, livekit_ws_url: str, homeservers: dict[str, str], key: str = LIVEKIT_KEY,
                 secret: str = LIVEKIT_SECRET, sfu_get_shapes: str = "both",
                 run_dir: str | os.PathLike | None = None, name: str = "lk-jwt", port: int = 0,
                 appservice: AppService | None = None, server_name: str | None = None,
                 synapse_url: str | None = None):
        """With ``appservice`` (and our homeserver's ``server_name`` and ``synapse_url``, asked
        for ``is_joined``) it serves the application-service routes as that service."""
        self.dir = run_dir_for(name, run_dir)
        self.argv = [LKSTACK_DIR / self.BINARY, "--listen", f"127.0.0.1:{port}", "--key", key,
                     "--secret", secret, "--livekit-url", livekit_ws_url,
                     "--sfu-get-shapes", sfu_get_shapes]
        for homeserver, base_url in homeservers.items():
            self.argv += ["--homeserver", f"{homeserver}={base_url}"]
        if appservice is not None:
            if not server_name or not synapse_url:
                raise ValueError("an application service needs server_name and synapse_url")
            self.argv += ["--hs-token", appservice.hs_token, "--as-token", appservice.as_token,
                          "--server-name", server_name, "--synapse", synapse_url]
        self.appservice = appservice
        self.livekit_ws_url = livekit_ws_url
        self.port = 0
        self.process: Process | None = None

    def start(self, timeout: float = 20.0) -> "LkJwtService":
        stdout = self.dir / "stdout"
        self.process = Process(self.BINARY, self.argv, self.dir / "lk-jwt.log",
                               stdout_path=stdout).start()

        def port_line() -> int | None:
            for line in tail(stdout, 50).splitlines():
                if line.startswith("listening on http://"):
                    return int(line.rsplit(":", 1)[1])
            return None

        self.port = wait_until(port_line, "lk-jwt-standin to print its port", timeout, self.process)
        return self

    def stop(self) -> None:
        if self.process:
            self.process.stop()

    def stats(self) -> dict:
        """What the stand-in did so far (``GET /stats``): ``requests`` per route, tokens
        ``issued`` (``client``, ``federation``, ``legacy``), ``create_room`` calls and
        ``create_room_failed`` (``client``, ``federation``)."""
        resp = http().get(f"{self.url}/stats", timeout=5)
        resp.raise_for_status()
        return resp.json()


class LiveKitClients:
    """Real LiveKit clients, one process driving them (``lk-participants``)."""

    def __init__(self, run_dir: str | os.PathLike | None = None, name: str = "clients"):
        self.dir = run_dir_for(name, run_dir)
        self.popen: subprocess.Popen | None = None
        self._lock = threading.Lock()
        self._count = 0

    def start(self) -> "LiveKitClients":
        log = open(self.dir / "clients.log", "ab")
        self.popen = subprocess.Popen([str(LKSTACK_DIR / "lk-participants")], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=log, start_new_session=True)
        log.close()
        return self

    def stop(self) -> None:
        if self.popen and self.popen.poll() is None:
            self.popen.stdin.close()  # type: ignore[union-attr]
            try:
                self.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.popen.kill()

    def _command(self, **command: Any) -> dict:
        if self.popen is None or self.popen.poll() is not None:
            raise StackError(f"lk-participants is not running; log: {tail(self.dir / 'clients.log')}")
        with self._lock:
            self.popen.stdin.write((json.dumps(command) + "\n").encode())  # type: ignore[union-attr]
            self.popen.stdin.flush()  # type: ignore[union-attr]
            line = self.popen.stdout.readline()  # type: ignore[union-attr]
        if not line:
            raise StackError(f"lk-participants ended; log: {tail(self.dir / 'clients.log')}")
        answer = json.loads(line)
        if not answer.get("ok"):
            raise StackError(f"lk-participants {command.get('op')}: {answer.get('error')}")
        return answer

    def join(self, token_response: "requests.Response | dict", signal_only: bool = False) -> str:
        """Connect with the token of an lk-jwt-service answer; return the client's handle.

        A full client is ACTIVE in LiveKit when this returns; ``signal_only`` opens only the
        signalling connection, which LiveKit lists as JOINING."""
        if isinstance(token_response, requests.Response):
            if token_response.status_code != 200:
                raise StackError(f"no token to join with: HTTP {token_response.status_code} "
                                 f"{token_response.text[:300]}")
            token_response = token_response.json()
        self._count += 1
        ref = f"c{self._count}"
        self._command(op="join_signal_only" if signal_only else "join", ref=ref,
                      url=token_response["url"], token=token_response["jwt"])
        return ref

    def leave(self, ref: str) -> None:
        self._command(op="leave", ref=ref)


class _Server(ThreadingHTTPServer):
    """A threaded HTTP server whose accept queue takes a burst: Envoy opens many connections
    at once, and a refused one would reach the guard as a 503 from LiveKit."""

    daemon_threads = True
    request_queue_size = 256


def serve(handler: type[BaseHTTPRequestHandler]) -> _Server:
    """A :class:`_Server` on a free loopback port, serving from a daemon thread."""
    server = _Server(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def shut(server: _Server | None) -> None:
    if server is not None:
        server.shutdown()
        server.server_close()


class _QuietHandler(BaseHTTPRequestHandler):
    """An HTTP/1.1 handler that logs nothing, for the servers the tests put in between."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:
        pass

    def read_body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))


class WebhookRelay:
    """Where the session's LiveKit posts its webhooks: each is passed on byte for byte (body,
    ``Authorization``, ``Content-Type``) to ``target`` (the Envoy under test, a URL with the path
    to post to), and LiveKit gets the target's status (so it retries on a 5xx as it would).
    Without a target a webhook is answered 200 and dropped.

    Every webhook is recorded (``seen``: ``(event name, headers, body)``) so that a test can
    replay one; with ``holding`` set they are kept back (``held``) instead of passed on, for
    :meth:`release` in any order; with ``dropping`` set they are lost."""

    def __init__(self) -> None:
        self.target: str | None = None
        self.holding = False
        self.dropping = False
        self.seen: list[tuple[str, dict[str, str], bytes]] = []
        self.held: list[tuple[str, dict[str, str], bytes]] = []
        self._lock = threading.Lock()
        self._server: _Server | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}/sfu_webhook"

    def start(self) -> "WebhookRelay":
        relay = self

        class Handler(_QuietHandler):
            def do_POST(self) -> None:
                body = self.read_body()
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() in ("authorization", "content-type")}
                try:
                    event = json.loads(body).get("event", "")
                except ValueError:
                    event = ""
                webhook = (event, headers, body)
                with relay._lock:
                    relay.seen.append(webhook)
                    hold, drop = relay.holding, relay.dropping
                    if hold:
                        relay.held.append(webhook)
                status = 200 if hold or drop else relay.send(webhook)
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self._server = serve(Handler)
        return self

    def send(self, webhook: tuple[str, dict[str, str], bytes]) -> int:
        """Pass one webhook on to the target as LiveKit sent it; the target's status."""
        if self.target is None:
            return 200
        _, headers, body = webhook
        try:
            return requests.post(self.target, data=body, headers=headers, timeout=10).status_code
        except requests.RequestException:
            return 502

    def release(self, reverse: bool = False) -> list[int]:
        """Pass on the webhooks held back (newest first with ``reverse``); stop holding."""
        with self._lock:
            held, self.held, self.holding = self.held, [], False
        return [self.send(webhook) for webhook in (reversed(held) if reverse else held)]

    def reset(self, target: str | None = None) -> None:
        with self._lock:
            self.target, self.holding, self.dropping = target, False, False
            self.seen.clear()
            self.held.clear()

    def stop(self) -> None:
        shut(self._server)


class LiveKitAPIProxy:
    """What the guard reaches as LiveKit: a pass-through to the real server's HTTP API that
    counts ``ListParticipants`` calls and can hold each answer back (``delay_ms``), for tests
    that need a slow LiveKit. Clients connect to the real server directly.

    ``clock_offset``: seconds the caller's wall clock runs ahead of LiveKit's (an Envoy under
    :class:`stack.ShiftedClock`). A token signed with the API secret has its times moved back
    by as much, so LiveKit judges it as the caller meant it; anything else passes unchanged."""

    def __init__(self, target: LiveKitServer):
        self.target = target
        self.delay_ms = 0
        self.clock_offset = 0
        self.list_participants_calls = 0
        # Answers sent back (a delayed call counts once its answer has left).
        self.answered = 0
        self._lock = threading.Lock()
        self._server: _Server | None = None

    @property
    def address(self) -> tuple[str, int]:
        assert self._server is not None
        return ("127.0.0.1", self._server.server_address[1])

    def start(self) -> "LiveKitAPIProxy":
        proxy = self

        class Handler(_QuietHandler):
            def do_POST(self) -> None:
                body = self.read_body()
                if self.path.endswith("/ListParticipants"):
                    with proxy._lock:
                        proxy.list_participants_calls += 1
                if proxy.delay_ms:
                    time.sleep(proxy.delay_ms / 1000)
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() in ("authorization", "content-type")}
                for name in [k for k in headers if k.lower() == "authorization"]:
                    headers[name] = proxy.restamped(headers[name])
                try:
                    resp = requests.post(f"{proxy.target.url}{self.path}", data=body,
                                         headers=headers, timeout=30)
                    status, content = resp.status_code, resp.content
                    content_type = resp.headers.get("Content-Type", "application/json")
                except requests.RequestException as exc:
                    status, content, content_type = 502, str(exc).encode(), "text/plain"
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(content)))
                self.end_headers()
                try:
                    self.wfile.write(content)
                finally:
                    with proxy._lock:
                        proxy.answered += 1

        self._server = serve(Handler)
        return self

    def restamped(self, authorization: str) -> str:
        """``Bearer <token>`` with the token's times moved back by :attr:`clock_offset`, when
        the API secret signed it."""
        scheme, _, token = authorization.partition(" ")
        if not self.clock_offset or scheme != "Bearer" or not signed_by(token, self.target.secret):
            return authorization
        claims = jwt_claims(token)
        for name in ("nbf", "iat", "exp"):
            if isinstance(claims.get(name), int):
                claims[name] -= self.clock_offset
        return f"Bearer {sign_hs256(claims, self.target.secret)}"

    def stop(self) -> None:
        shut(self._server)


class RealStandIns:
    """The test stack's lk-jwt-service and LiveKit, real where it can be: the Go lk-jwt-service
    stand-in, the real LiveKit server behind :class:`LiveKitAPIProxy`, and real clients.

    It offers what tests ask of "lk-jwt-service and LiveKit": the addresses Envoy needs
    (``jwt_address``, ``livekit_address``), the URL clients get (``livekit_ws_url``), and
    ways to put participants in a room: :meth:`set_room` connects real clients with tokens
    minted for the identities asked for (the way lk-jwt-service would), :meth:`connect` joins
    with a token the guard let through.
    """

    def __init__(self, synapse_server_name: str, synapse_url: str,
                 foreign_homeserver: "ForeignHomeserver | None" = None,
                 key: str = LIVEKIT_KEY, secret: str = LIVEKIT_SECRET, sfu_get_shapes: str = "both",
                 name: str = "real", appservice: AppService | None = None):
        """``appservice``: the stand-in also serves the routes Synapse forwards to it, as
        that application service of the Synapse named by ``synapse_server_name``."""
        self.key, self.secret = key, secret
        self.synapse_server_name, self.synapse_url = synapse_server_name, synapse_url
        self.appservice = appservice
        self.webhooks = WebhookRelay()
        self.livekit = LiveKitServer(key, secret, name=f"{name}-livekit",
                                     webhook_urls=[self.webhooks.start().url])
        self.proxy = LiveKitAPIProxy(self.livekit)
        self.clients = LiveKitClients(name=f"{name}-clients")
        self.homeservers = {synapse_server_name: synapse_url}
        self.foreign = foreign_homeserver
        self.sfu_get_shapes = sfu_get_shapes
        self.name = name
        self.jwt: LkJwtService | None = None
        # alias -> identity -> client handle
        self.rooms: dict[str, dict[str, str]] = {}

    def start(self) -> "RealStandIns":
        self.livekit.start()
        self.proxy.start()
        self.clients.start()
        homeservers = dict(self.homeservers)
        if self.foreign is not None:
            for server_name in self.foreign.server_names:
                homeservers[server_name] = self.foreign.url
        self.jwt = LkJwtService(self.livekit.ws_url, homeservers, self.key, self.secret,
                                self.sfu_get_shapes, name=f"{self.name}-lk-jwt",
                                appservice=self.appservice, server_name=self.synapse_server_name,
                                synapse_url=self.synapse_url).start()
        return self

    def stop(self) -> None:
        for part in (self.jwt, self.clients, self.proxy, self.livekit, self.webhooks):
            if part is not None:
                part.stop()

    @property
    def jwt_address(self) -> tuple[str, int]:
        assert self.jwt is not None
        return self.jwt.address

    @property
    def jwt_url(self) -> str:
        assert self.jwt is not None
        return self.jwt.url

    @property
    def livekit_address(self) -> tuple[str, int]:
        return self.proxy.address

    @property
    def livekit_ws_url(self) -> str:
        return self.livekit.ws_url

    def _mint(self, alias: str, identity: str) -> str:
        return join_token(self.key, self.secret, alias, identity)

    def set_room(self, alias: str, participants: list[dict] | list[tuple[str, str]]) -> None:
        """Make the LiveKit room hold exactly these ``(identity, state)`` participants: real
        clients connect (``ACTIVE``: fully; ``JOINING``/``JOINED``: signalling only) or leave.
        ``DISCONNECTED`` participants are not connected: LiveKit drops a participant that
        leaves from its list at once."""
        wanted: dict[str, str] = {}
        for p in participants:
            identity, state = (p["identity"], p.get("state", "ACTIVE")) if isinstance(p, dict) else p
            if state != "DISCONNECTED":
                wanted[identity] = state
        room = self.rooms.setdefault(alias, {})
        for identity in [i for i in room if i not in wanted]:
            self._drop(alias, identity, room.pop(identity))
        for identity, state in wanted.items():
            if identity not in room:
                token = {"url": self.livekit.ws_url, "jwt": self._mint(alias, identity)}
                room[identity] = self.clients.join(token, signal_only=state != "ACTIVE")
        wait_until(lambda: set(self.livekit.states(alias)) == set(wanted),
                   f"LiveKit to list {sorted(wanted)} in {alias}", 15)

    def connect(self, token_response: "requests.Response | dict | str", state: str | None = None) -> str:
        """Join with the token of an lk-jwt-service answer (response, parsed body or bare JWT)."""
        if isinstance(token_response, str):
            token_response = {"url": self.livekit.ws_url, "jwt": token_response}
        if isinstance(token_response, requests.Response):
            if token_response.status_code != 200:
                raise StackError(f"no token to connect with: HTTP {token_response.status_code} "
                                 f"{token_response.text[:300]}")
            token_response = token_response.json()
        claims = jwt_claims(token_response["jwt"])
        alias, identity = claims["video"]["room"], claims["sub"]
        handle = self.clients.join(token_response, signal_only=state not in (None, "ACTIVE"))
        self.rooms.setdefault(alias, {})[identity] = handle
        return handle

    def leave(self, alias: str, identity: str) -> None:
        handle = self.rooms.get(alias, {}).pop(identity, None)
        if handle is not None:
            self._drop(alias, identity, handle)
        wait_until(lambda: identity not in self.livekit.states(alias),
                   f"LiveKit to drop {identity}", 15)

    def _drop(self, alias: str, identity: str, handle: str) -> None:
        """The client leaves, and LiveKit is told to forget it: a client that leaves within
        milliseconds of joining can close its connection before LiveKit reads the leave, and
        LiveKit then lists it until its connection times out (about 20 s)."""
        self.clients.leave(handle)
        self.livekit.remove_participant(alias, identity)

    def set_delay(self, delay_ms: int) -> None:
        """Delay every answer the guard gets from LiveKit (to hold a check open)."""
        self.proxy.delay_ms = delay_ms

    def list_participants(self, alias: str) -> list[dict]:
        return self.livekit.list_participants(alias)

    def livekit_stats(self) -> dict:
        return {"list_participants_calls": self.proxy.list_participants_calls}

    def reset(self) -> None:
        """Everyone leaves, no delay."""
        for alias, room in self.rooms.items():
            for handle in room.values():
                self.clients.leave(handle)
            room.clear()
        self.rooms.clear()
        self.proxy.delay_ms = 0
        self.proxy.clock_offset = 0
        self.webhooks.reset()


class ForeignHomeserver:
    """Other homeservers' OpenID userinfo endpoint, for users not on the test Synapse (a
    server name with a port, say). It vouches for whoever an ``openid:@user:server`` token
    names, as that user's own homeserver would for a token it issued; ``#anything`` after the
    user makes a fresh token of the same user, as ``/openid/request_token`` mints one per
    request."""

    def __init__(self, server_names: list[str]):
        self.server_names = server_names
        self._server: _Server | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> "ForeignHomeserver":
        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                query = urllib.parse.urlparse(self.path).query
                token = urllib.parse.parse_qs(query).get("access_token", [""])[0]
                if token.startswith("openid:@"):
                    sub = token[len("openid:"):].split("#", 1)[0]
                    status, body = 200, json.dumps({"sub": sub}).encode()
                else:
                    status, body = 401, b'{"errcode":"M_UNKNOWN_TOKEN","error":"Unknown token"}'
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self._server = serve(Handler)
        return self

    def stop(self) -> None:
        shut(self._server)


def join_token(key: str, secret: str, alias: str, identity: str, ttl: int = 3600) -> str:
    """A LiveKit join token for ``identity`` in room ``alias`` (what lk-jwt-service mints)."""
    now = int(time.time())
    return sign_hs256({
        "iss": key, "sub": identity, "nbf": now - 5, "exp": now + ttl,
        "video": {"roomJoin": True, "room": alias, "canPublish": True, "canSubscribe": True}},
        secret)
