"""`make demo`: the whole voice-limit-guard path on one machine, in about ten seconds.

Starts a real Synapse, a real LiveKit server, the lk-jwt-service stand-in (Go, checking real
OpenID tokens) and Envoy running ``envoy/envoy.yaml`` exactly as an operator would (same
ports, same secrets from the environment, module path relative to the repository root).
Then it creates a room limited to two users and walks through joins with real LiveKit
clients that connect and stay, printing each HTTP status and what it means, who LiveKit
lists in the call, and finally the filter's counters.

The exit status is 0 only if every step answered as expected, so the demo doubles as
a check of the example configuration. ``--free-ports`` runs the same walk-through on
free ports (through a temporary copy of envoy.yaml), for tests and busy machines.
"""

from __future__ import annotations

import argparse
import json
import re
import socket
import sys
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))

import stack  # noqa: E402
from realstack import LiveKitClients, LiveKitServer, LkJwtService, missing_binaries  # noqa: E402
from stack import (  # noqa: E402  (the path above makes the harness importable)
    LEGACY_SLOT,
    LIVEKIT_KEY,
    LIVEKIT_SECRET,
    LIMIT_STATE_TYPE,
    REPO,
    SERVER_NAME,
    STACK_ROOT,
    WASM_PATH,
    RTC_CLIENT_TOKEN_PATHS,
    AppService,
    Process,
    StackError,
    Synapse,
    envoy_binary,
    http,
    install_signal_handlers,
    join_body,
    jwt_claims,
    livekit_alias,
    openid_token,
    rejection_lines,
    run_dir_for,
    tail,
    wait_until,
)

EXAMPLE_CONFIG = REPO / "envoy" / "envoy.yaml"
# The module path envoy.yaml names, relative to the repository root.
EXAMPLE_WASM = "target/wasm32-wasip1/release/voice_limit_guard.wasm"
LIMIT = 2
EXIT_PORT_BUSY = 2


# --------------------------------------------------------------------------- ports


@dataclass(frozen=True)
class Ports:
    """Where each component listens; the defaults are the ones envoy/envoy.yaml names."""

    listener: int = 8090
    admin: int = 9901
    lk_jwt: int = 8081
    synapse: int = 8008
    livekit: int = 7880

    def described(self) -> list[tuple[str, str, int]]:
        """(component, bind address, port) for each port, as the components bind them."""
        return [
            ("Envoy listener", "0.0.0.0", self.listener),
            ("Envoy admin", "127.0.0.1", self.admin),
            ("lk-jwt-service stand-in", "127.0.0.1", self.lk_jwt),
            ("Synapse", "127.0.0.1", self.synapse),
            ("LiveKit", "127.0.0.1", self.livekit),
        ]


def pick_free_ports() -> Ports:
    """Five distinct ports the kernel just handed out (held together so none repeats)."""
    sockets = []
    try:
        for _ in range(5):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return Ports(*(s.getsockname()[1] for s in sockets))
    finally:
        for sock in sockets:
            sock.close()


def busy_ports(ports: Ports) -> list[tuple[str, int]]:
    """The ports something already listens on.

    SO_REUSEADDR mirrors what the servers set, so a port left in TIME_WAIT by an
    earlier run does not count as taken, while a live listener does.
    """
    taken = []
    for name, host, port in ports.described():
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
            except OSError:
                taken.append((name, port))
    return taken


def envoy_config_for(ports: Ports, run_dir: Path) -> Path:
    """envoy/envoy.yaml itself on the default ports, else a copy with the ports substituted.

    The copy changes nothing but ports (and the module path when ``VLG_WASM`` names
    another build), so the walk-through still exercises the operators' configuration.
    """
    if ports == Ports() and WASM_PATH == REPO / EXAMPLE_WASM:
        return EXAMPLE_CONFIG
    mapping = {str(default): str(chosen) for default, chosen in zip(_port_values(Ports()), _port_values(ports))}
    text = EXAMPLE_CONFIG.read_text()
    found = set(re.findall(r"port_value: (\d+)", text))
    if found != set(mapping):
        raise StackError(f"{EXAMPLE_CONFIG} names ports {sorted(found)}, expected {sorted(mapping)}")
    text = re.sub(r"port_value: (\d+)", lambda m: f"port_value: {mapping[m.group(1)]}", text)
    text = text.replace(f"filename: {EXAMPLE_WASM}", f"filename: {WASM_PATH}")
    copy = run_dir / "envoy.yaml"
    copy.write_text(text)
    return copy


def _port_values(ports: Ports) -> list[int]:
    return [port for _, _, port in ports.described()]


# --------------------------------------------------------------------------- components on fixed ports


class FixedPortSynapse(Synapse):
    """Synapse on the port envoy.yaml's ``synapse`` cluster names, instead of a random one."""

    def __init__(self, port: int, **kwargs: Any):
        super().__init__(**kwargs)
        self.fixed_port = port

    def _generate_config(self) -> None:
        super()._generate_config()
        overrides_path = self.dir / "overrides.yaml"
        overrides = json.loads(overrides_path.read_text())
        overrides["listeners"][0]["port"] = self.fixed_port
        overrides_path.write_text(json.dumps(overrides, indent=2))
        self.port = self.fixed_port


class ExampleEnvoy:
    """Envoy running an operator's configuration file unchanged, from the repository root."""

    def __init__(self, config: Path, ports: Ports, admin_token: str, hs_token: str, secret: str,
                 run_dir: Path):
        self.config = config
        self.ports = ports
        self.env = {"SYNAPSE_ADMIN_TOKEN": admin_token, "LK_JWT_HS_TOKEN": hs_token,
                    "LIVEKIT_KEY": LIVEKIT_KEY, "LIVEKIT_SECRET": secret}
        self.dir = run_dir
        self.log_path = run_dir / "envoy.log"
        self.process: Process | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.ports.listener}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.admin}"

    def start(self, timeout: float = 30.0) -> "ExampleEnvoy":
        """Start Envoy and wait for admin ``/ready``; a refused configuration raises with Envoy's reasons."""
        self.process = Process(
            "envoy",
            [envoy_binary(), "-c", self.config, "--disable-hot-restart", "--concurrency", "2",
             "--log-path", self.log_path],
            self.dir / "envoy.out.log",
            env=self.env,
            cwd=REPO,
        ).start()
        try:
            wait_until(self._ready, f"Envoy admin {self.admin_url}/ready", timeout, self.process)
        except StackError as exc:
            raise StackError(f"{exc}\n{self._errors()}(Envoy's full log: {_shown(self.log_path)})") from None
        return self

    def _errors(self) -> str:
        """Envoy's error lines: why it refused the configuration, which the console tail may lack."""
        log = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "".join(f"{line}\n" for line in rejection_lines(log))

    def _ready(self) -> bool:
        resp = http().get(f"{self.admin_url}/ready", timeout=2)
        return resp.status_code == 200 and resp.text.strip() == "LIVE"

    def stop(self) -> None:
        if self.process:
            self.process.stop()

    def counters(self) -> list[str]:
        """The filter's own statistics (``name: value``), without Envoy's Wasm VM bookkeeping."""
        resp = http().get(f"{self.admin_url}/stats", params={"filter": "voice_limit_guard"}, timeout=5)
        resp.raise_for_status()
        return [line for line in resp.text.splitlines() if line.startswith("wasmcustom.")]


# --------------------------------------------------------------------------- the walk-through


@dataclass
class Step:
    """One request through Envoy, the status it should get and what that status means."""

    who: str
    device: str
    method: str
    path: str
    expect: int
    meaning: str
    body: dict | None = None
    note: str = ""
    headers: dict = field(default_factory=dict)
    connect: bool = False

    def label(self) -> str:
        if not self.device:
            return f"{self.who} {self.method} {self.path}"
        device = f"device {self.device}" + (f", {self.note}" if self.note else "")
        return f"{self.who:<5} ({device}) {self.method} {self.path}"


def user_id(name: str) -> str:
    return f"@{name}:{SERVER_NAME}"


def token_step(who: str, device: str, room: str, expect: int, meaning: str,
               shape: str = "legacy", note: str = "") -> Step:
    """A token request: the legacy ``/sfu/get`` body, or the ``/get_token`` body for ``shape="new"``."""
    path = "/sfu/get" if shape == "legacy" else "/get_token"
    return Step(who, device, "POST", path, expect, meaning,
                body=join_body(user_id(who), device, room, shape=shape), note=note,
                connect=expect == 200)


def limited_room_steps(room: str) -> list[Step]:
    issued = "token issued, connects to LiveKit"
    return [
        token_step("alice", "A1", room, 200, f"{issued} (1 of {LIMIT})"),
        token_step("bob", "B1", room, 200, f"{issued} (2 of {LIMIT})", shape="new"),
        token_step("carol", "C1", room, 403, "refused: the call already holds its limit"),
        token_step("alice", "A2", room, 200, "let in: alice is already in the call",
                   note="second device"),
    ]


def open_room_steps(room: str) -> list[Step]:
    meaning = "token issued: no limit on this room"
    return [token_step(name, f"{name[0].upper()}9", room, 200, meaning) for name in ("alice", "bob", "carol")]


def preflight_step() -> Step:
    headers = {"Origin": "https://call.example", "Access-Control-Request-Method": "POST",
               "Access-Control-Request-Headers": "content-type"}
    return Step("a browser", "", "OPTIONS", "/sfu/get", 200,
                "CORS preflight passes through to lk-jwt-service unchecked", headers=headers)


class Walkthrough:
    """Runs steps against Envoy, prints one line each and remembers any unexpected answer."""

    def __init__(self, envoy: ExampleEnvoy, clients: LiveKitClients, out: Callable[[str], None] = print):
        self.envoy = envoy
        self.clients = clients
        self.out = out
        self.failures: list[str] = []
        # (who, device) -> the LiveKit client connected with that token, and its identity
        self.connected: dict[tuple[str, str], str] = {}
        self.identities: dict[tuple[str, str], str] = {}

    def run(self, steps: list[Step]) -> None:
        for step in steps:
            self.run_step(step)

    def run_step(self, step: Step) -> None:
        kwargs: dict[str, Any] = {"headers": dict(step.headers), "timeout": 20}
        if step.body is not None:
            kwargs["json"] = step.body
        try:
            resp = http().request(step.method, f"{self.envoy.url}{step.path}", **kwargs)
        except requests.RequestException as exc:
            self.out(f"  {step.label()} -> no answer: {exc}")
            self.failures.append(f"{step.label()}: no answer from Envoy ({exc})")
            return
        detail = self.describe(step, resp)
        if resp.status_code == step.expect and step.connect:
            detail += self.connect(step, resp)
        self.out(f"  {step.label()} -> {resp.status_code} {detail}")
        if resp.status_code != step.expect:
            self.failures.append(f"{step.label()}: expected {step.expect}, got {resp.status_code}")

    def describe(self, step: Step, resp: requests.Response) -> str:
        """The step's meaning, the error body of a refusal, or a flag on an unexpected status."""
        if resp.status_code != step.expect:
            return f"UNEXPECTED (expected {step.expect}: {step.meaning}) {resp.text.strip()[:300]}"
        if resp.status_code >= 400:
            return resp.text.strip()
        return step.meaning

    def connect(self, step: Step, resp: requests.Response) -> str:
        """Join LiveKit with the issued JWT, as a client would; a failure fails the step."""
        try:
            self.connected[(step.who, step.device)] = self.clients.join(resp)
            self.identities[(step.who, step.device)] = jwt_claims(resp.json()["jwt"])["sub"]
        except (StackError, requests.RequestException, ValueError, KeyError) as exc:
            self.failures.append(f"connecting to LiveKit with the issued token: {exc}")
            return f" (but connecting to LiveKit failed: {exc})"
        return ""

    def through_synapse(self, synapse: Synapse, livekit_url: str, room: str,
                        steps: list[tuple[str, str, str, int, str]]) -> None:
        """Token requests as current clients send them: to Synapse, with the user's access
        token and a member id; a 200 connects a real LiveKit client with the token."""
        for who, token, member, expect, meaning in steps:
            label = f"{who:<5} (member {member}) POST {RTC_CLIENT_TOKEN_PATHS['stable']} (Synapse)"
            try:
                resp = synapse.rtc_token(token, room, member, livekit_url)
            except requests.RequestException as exc:
                self.out(f"  {label} -> no answer: {exc}")
                self.failures.append(f"{label}: no answer from Synapse ({exc})")
                continue
            if resp.status_code != expect:
                detail = f"UNEXPECTED (expected {expect}: {meaning}) {resp.text.strip()[:300]}"
                self.failures.append(f"{label}: expected {expect}, got {resp.status_code}")
            elif resp.status_code >= 400:
                detail = resp.text.strip()
            else:
                detail = meaning
                try:
                    self.connected[(who, member)] = self.clients.join(
                        {"url": livekit_url, "jwt": resp.json()["jwt"]})
                except (StackError, requests.RequestException, ValueError, KeyError) as exc:
                    self.failures.append(f"connecting to LiveKit with the issued token: {exc}")
                    detail += f" (but connecting to LiveKit failed: {exc})"
            self.out(f"  {label} -> {resp.status_code} {detail}")

    def leave(self, who: str, device: str) -> None:
        """The client of ``who`` on ``device`` hangs up."""
        handle = self.connected.pop((who, device), None)
        if handle is None:
            self.failures.append(f"{who} ({device}) never connected, so cannot leave")
            return
        self.clients.leave(handle)
        self.out(f"  {who:<5} (device {device}) leaves the call")


# --------------------------------------------------------------------------- the demo


class Demo:
    """Owns the components, so one ``stop`` tears down whatever got started."""

    def __init__(self, ports: Ports, run_dir: Path):
        self.ports = ports
        self.run_dir = run_dir
        self.synapse: FixedPortSynapse | None = None
        self.livekit: LiveKitServer | None = None
        self.lk_jwt: LkJwtService | None = None
        self.clients: LiveKitClients | None = None
        self.envoy: ExampleEnvoy | None = None
        self.rooms: dict[str, str] = {}

    def start(self) -> None:
        """Synapse first (lk-jwt-service checks OpenID tokens with it, and Envoy needs the
        admin's access token in its environment), then LiveKit and lk-jwt-service, then Envoy.
        lk-jwt-service is Synapse's application service, whose proxy URL is Envoy's listener:
        the MatrixRTC token requests Synapse forwards go through the guard."""
        started = time.monotonic()
        self.synapse = FixedPortSynapse(self.ports.synapse, run_dir=self.run_dir / "synapse",
                                        appservice=AppService(),
                                        proxy_port=self.ports.listener).start()
        stack.OPENID_PROVIDER = self.synapse.openid_token
        # LiveKit posts its webhooks to lk-jwt-service's /sfu_webhook through Envoy, where
        # the guard reads them (envoy/envoy.yaml sets `webhooks`).
        self.livekit = LiveKitServer(secret=LIVEKIT_SECRET, run_dir=self.run_dir / "livekit",
                                     port=self.ports.livekit,
                                     webhook_urls=[f"http://127.0.0.1:{self.ports.listener}/sfu_webhook"]).start()
        self.lk_jwt = LkJwtService(self.livekit.ws_url, {SERVER_NAME: self.synapse.base_url},
                                   secret=LIVEKIT_SECRET, run_dir=self.run_dir / "lk-jwt",
                                   port=self.ports.lk_jwt, appservice=self.synapse.appservice,
                                   server_name=SERVER_NAME, synapse_url=self.synapse.base_url).start()
        self.clients = LiveKitClients(run_dir=self.run_dir / "clients").start()
        config = envoy_config_for(self.ports, self.run_dir)
        self.envoy = ExampleEnvoy(config, self.ports, self.synapse.admin_token,
                                  self.synapse.appservice.hs_token, LIVEKIT_SECRET,
                                  run_dir_for("envoy", self.run_dir / "envoy")).start()
        print(f"Stack up in {time.monotonic() - started:.1f}s: Synapse {self.synapse.base_url}, "
              f"LiveKit :{self.ports.livekit}, lk-jwt-service stand-in :{self.ports.lk_jwt}, "
              f"Envoy :{self.ports.listener} (admin :{self.ports.admin}) with {_shown(config)}")

    def walk(self) -> list[str]:
        """Every scenario in order; returns the unexpected answers (none means success)."""
        assert self.synapse and self.envoy and self.clients and self.livekit
        walk = Walkthrough(self.envoy, self.clients)
        limited = self.new_room("Limited call", LIMIT)
        print(f"\nRoom {limited}: {LIMIT_STATE_TYPE} {json.dumps({'max_users': LIMIT})}")
        walk.run(limited_room_steps(limited))
        self.print_call(limited)
        walk.leave("bob", "B1")
        wait_until(lambda: len(self.livekit.list_participants(livekit_alias(limited))) == 2,
                   "LiveKit to drop bob", 15)
        # LiveKit lists bob as gone a few milliseconds before it posts participant_left; the
        # guard frees his place when that webhook arrives, not before.
        bob = walk.identities.get(("bob", "B1"), "")
        wait_until(lambda: self.livekit.delivered("participant_left", bob),
                   "LiveKit's participant_left of bob to reach the guard", 15)
        print("  LiveKit posts participant_left of bob to /sfu_webhook: the guard frees his place")
        walk.run([token_step("carol", "C1", limited, 200, "token issued: bob's place is free")])
        self.print_call(limited)
        open_room = self.new_room("Open call", None)
        print(f"\nRoom {open_room}: no {LIMIT_STATE_TYPE}, so everyone is let in")
        walk.run(open_room_steps(open_room))
        print("\nCORS preflight")
        walk.run([preflight_step()])
        self.walk_through_synapse(walk)
        return walk.failures

    def walk_through_synapse(self, walk: "Walkthrough") -> None:
        """What current clients do: ask their homeserver (MSC4195), which forwards the request
        to lk-jwt-service through Envoy and the guard; the guard decides before lk-jwt-service
        sees it, and Synapse relays the answer."""
        assert self.synapse and self.livekit
        accounts = {name: self.account(name) for name in ("erin", "frank", "grace")}
        room = self.synapse.create_room("Call through Synapse", preset="public_chat")
        self.synapse.set_limit(room, LIMIT)
        for token in accounts.values():
            self.synapse.join_room(room, token)
        self.rooms["Call through Synapse"] = room
        print(f"\nRoom {room} (Call through Synapse): {LIMIT_STATE_TYPE} {json.dumps({'max_users': LIMIT})}; current clients "
              f"ask Synapse's {RTC_CLIENT_TOKEN_PATHS['stable']} with their own access tokens")
        issued = "token issued, connects to LiveKit"
        walk.through_synapse(self.synapse, self.livekit.ws_url, room, [
            ("erin", accounts["erin"], "E1", 200, f"{issued} (1 of {LIMIT})"),
            ("frank", accounts["frank"], "F1", 200, f"{issued} (2 of {LIMIT})"),
            ("grace", accounts["grace"], "G1", 403, "refused by the guard before lk-jwt-service saw it"),
            ("erin", accounts["erin"], "E2", 200, "let in: erin is already in the call"),
        ])
        self.print_call(room, LEGACY_SLOT)

    def account(self, name: str) -> str:
        """A user of the demo's Synapse (made through the admin API); returns an access token."""
        assert self.synapse
        user = urllib.parse.quote(user_id(name), safe="")
        admin = self.synapse.admin_token
        for method, path, body in (("PUT", f"/_synapse/admin/v2/users/{user}", {"password": f"{name}-demo"}),
                                   ("POST", f"/_synapse/admin/v1/users/{user}/login", {})):
            resp = self.synapse.request(method, path, admin, json=body)
            if resp.status_code not in (200, 201):
                raise StackError(f"making {name}'s account: HTTP {resp.status_code} {resp.text[:300]}")
        return resp.json()["access_token"]

    def new_room(self, name: str, limit: int | None) -> str:
        """A room created through the client API, with the limit set as a room admin would."""
        assert self.synapse
        room = self.synapse.create_room(name)
        if limit is not None:
            self.synapse.set_limit(room, limit)
        self.rooms[name] = room
        return room

    def print_call(self, room: str, slot: str = LEGACY_SLOT) -> None:
        """Who LiveKit itself lists in the room's call (its ListParticipants API)."""
        assert self.livekit
        listed = self.livekit.list_participants(livekit_alias(room, slot))
        print(f"  LiveKit lists {len(listed)} participants: "
              + ", ".join(f"{p['identity']} ({p.get('state', 'JOINING')})" for p in listed))

    def print_counters(self) -> None:
        assert self.envoy
        print(f"\nFilter counters ({self.envoy.admin_url}/stats?filter=voice_limit_guard):")
        for line in self.envoy.counters():
            print(f"  {line}")

    def print_endpoints(self) -> None:
        """What a user needs to poke the running stack by hand."""
        assert self.synapse and self.envoy
        room = self.rooms.get("Limited call", "!ROOM")
        body = {"room": room, "openid_token": openid_token(user_id("dave")), "device_id": "D1"}
        print("\nThe stack keeps running (Ctrl-C stops it):")
        print(f"  Envoy (token endpoints)  {self.envoy.url}/sfu/get, {self.envoy.url}/get_token")
        print(f"  Envoy admin              {self.envoy.admin_url}/stats?filter=voice_limit_guard")
        print(f"  Synapse                  {self.synapse.base_url} (admin token: {self.synapse.admin_token})")
        print(f"  LiveKit                  ws://127.0.0.1:{self.ports.livekit} (key {LIVEKIT_KEY})")
        print("  Try (dave is refused: the limited room is full):")
        print(f"    curl -si {self.envoy.url}/sfu/get -d '{json.dumps(body)}'")

    def wait_for_interrupt(self) -> None:
        """Sleep until Ctrl-C or a signal; stop early if a component dies, since the stack is broken then."""
        processes = [p for p in self.processes() if p is not None]
        while True:
            dead = [p.name for p in processes if p.exited()]
            if dead:
                raise StackError(f"{', '.join(dead)} exited; see the logs")
            time.sleep(1)

    def processes(self) -> list[Process | None]:
        found: list[Process | None] = []
        if self.envoy:
            found.append(self.envoy.process)
        if self.livekit:
            found.append(self.livekit.process)
        if self.lk_jwt:
            found.append(self.lk_jwt.process)
        if self.synapse:
            found.append(self.synapse.process)
        return found

    def stop(self) -> None:
        for component in (self.envoy, self.clients, self.lk_jwt, self.livekit, self.synapse):
            if component is not None:
                component.stop()


def _shown(path: Path) -> str:
    """A path relative to the repository when it lies inside it (shorter, and what users type)."""
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--free-ports", action="store_true",
                        help="use free ports instead of envoy.yaml's (runs a temporary copy of envoy.yaml)")
    parser.add_argument("--keep-running", action="store_true",
                        help="keep the stack up after the walk-through until Ctrl-C")
    parser.add_argument("--run-dir", type=Path, default=STACK_ROOT / "demo",
                        help="where logs and state go (each run replaces its envoy/, livekit/, lk-jwt/, clients/, synapse/; default .stack/demo)")
    return parser.parse_args(argv)


def missing_build() -> str | None:
    """What has to be built before the demo can run, or None."""
    if not WASM_PATH.exists():
        return f"Wasm module not built: {_shown(WASM_PATH)} (run `make build`)"
    missing = missing_binaries()
    if missing:
        return f"not built: {', '.join(missing)}"
    return None


def busy_ports_message(ports: Ports) -> str | None:
    """Which of envoy.yaml's ports are taken, and the way out; None if all are free."""
    busy = busy_ports(ports)
    if not busy:
        return None
    listed = ", ".join(f"{port} ({name})" for name, port in busy)
    noun, pronoun = ("port", "it") if len(busy) == 1 else ("ports", "them")
    return (f"{noun} {listed} already in use; envoy/envoy.yaml needs {pronoun}. Stop whatever "
            f"listens there, or run `.venv/bin/python {_shown(Path(__file__))} --free-ports` to use free ports.")


def run(args: argparse.Namespace) -> int:
    """Start, walk through, report; always stop everything and say where the logs are."""
    ports = pick_free_ports() if args.free_ports else Ports()
    problem = missing_build()
    if problem:
        print(f"demo: {problem}", file=sys.stderr)
        return 1
    problem = None if args.free_ports else busy_ports_message(ports)
    if problem:
        print(f"demo: {problem}", file=sys.stderr)
        return EXIT_PORT_BUSY
    run_dir = run_dir_for("demo", args.run_dir, fresh=False)
    demo = Demo(ports, run_dir)
    started = time.monotonic()
    status = 1
    try:
        demo.start()
        failures = demo.walk()
        demo.print_counters()
        status = report(failures, time.monotonic() - started)
        if args.keep_running:
            demo.print_endpoints()
            demo.wait_for_interrupt()
    except KeyboardInterrupt:
        print("\nInterrupted.")
        status = status if args.keep_running and status == 0 else 130
    except StackError as exc:
        print(f"\ndemo: {exc}", file=sys.stderr)
        status = 1
    finally:
        print("Stopping Envoy, the LiveKit clients, lk-jwt-service, LiveKit and Synapse...")
        demo.stop()
        print(f"Logs: {_shown(run_dir)}/ (envoy/, livekit/, lk-jwt/, clients/, synapse/)")
    return status


def report(failures: list[str], elapsed: float) -> int:
    if failures:
        print(f"\nFAILED: {len(failures)} step(s) did not answer as expected:")
        for failure in failures:
            print(f"  {failure}")
        return 1
    print(f"\nAll steps answered as expected ({elapsed:.1f}s).")
    return 0


def main(argv: list[str] | None = None) -> int:
    # Errors go to stderr; line buffering keeps them in order with the steps when piped (make, tests).
    sys.stdout.reconfigure(line_buffering=True)
    install_signal_handlers()
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
