"""The real LiveKit server, the Go lk-jwt-service stand-in and real LiveKit clients, on loopback.

- :class:`LiveKitServer`: ``livekit-server`` built from the Go module registry (``make
  livekit``), single node, no Redis, one UDP and one TCP port for media, API key and secret
  from a config file.
- :class:`LkJwtService`: the lk-jwt-service stand-in (``tests/lkstack``, Go): it reads
  requests with Go's ``encoding/json`` and checks OpenID tokens against Synapse's federation
  userinfo endpoint, so test users need real OpenID tokens (:meth:`stack.Synapse.openid_token`).
- :class:`LiveKitClients`: real clients (the LiveKit Go SDK) that connect with the tokens the
  guard let through, stay, and leave.

Like :mod:`stack`, no test-framework imports.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
from pathlib import Path
from typing import Any

import requests

from stack import (
    LIVEKIT_KEY,
    LIVEKIT_SECRET,
    REPO,
    Process,
    StackError,
    free_port,
    http,
    livekit_admin_token,
    run_dir_for,
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


class LiveKitServer:
    """A real LiveKit server (single node, no Redis) on 127.0.0.1."""

    def __init__(self, key: str = LIVEKIT_KEY, secret: str = LIVEKIT_SECRET,
                 run_dir: str | os.PathLike | None = None, name: str = "livekit"):
        self.dir = run_dir_for(name, run_dir)
        self.key = key
        self.secret = secret
        self.port = 0
        self.process: Process | None = None

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> "LiveKitServer":
        if not LIVEKIT_BIN.exists():
            raise StackError(f"LiveKit server not built: {LIVEKIT_BIN} (make livekit)")
        self.port = free_port()
        config = {
            "port": self.port,
            "bind_addresses": ["127.0.0.1"],
            "rtc": {"tcp_port": free_port(), "udp_port": free_port(), "node_ip": "127.0.0.1",
                    "use_external_ip": False},
            "keys": {self.key: self.secret},
            "room": {"auto_create": True, "empty_timeout": 60, "departure_timeout": 1},
            "logging": {"level": "info", "json": False},
        }
        path = self.dir / "livekit.yaml"
        path.write_text(json.dumps(config, indent=2))  # JSON is YAML
        self.process = Process("livekit", [LIVEKIT_BIN, "--config", path],
                               self.dir / "livekit.log").start()
        wait_until(lambda: http().get(self.http_url, timeout=2).status_code == 200,
                   "LiveKit to answer", timeout, self.process)
        return self

    def stop(self) -> None:
        if self.process:
            self.process.stop()

    def list_participants(self, alias: str) -> list[dict]:
        """``ListParticipants`` exactly as the filter asks it (Twirp JSON, an admin token)."""
        resp = http().post(
            f"{self.http_url}/twirp/livekit.RoomService/ListParticipants", json={"room": alias},
            headers={"Authorization": f"Bearer {livekit_admin_token(self.key, self.secret, alias)}"},
            timeout=10)
        if resp.status_code != 200:
            raise StackError(f"ListParticipants: HTTP {resp.status_code} {resp.text[:300]}")
        return resp.json().get("participants", [])

    def states(self, alias: str) -> dict[str, str]:
        """Identity -> state of each participant LiveKit lists in the room."""
        return {p["identity"]: p.get("state", "JOINING") for p in self.list_participants(alias)}


class LkJwtService:
    """The Go lk-jwt-service stand-in, in front of a real LiveKit and a real Synapse."""

    BINARY = "lk-jwt-standin"

    def __init__(self, livekit_ws_url: str, homeservers: dict[str, str], key: str = LIVEKIT_KEY,
                 secret: str = LIVEKIT_SECRET, sfu_get_shapes: str = "both",
                 run_dir: str | os.PathLike | None = None, name: str = "lk-jwt"):
        self.dir = run_dir_for(name, run_dir)
        self.argv = [LKSTACK_DIR / self.BINARY, "--listen", "127.0.0.1:0", "--key", key,
                     "--secret", secret, "--livekit-url", livekit_ws_url,
                     "--sfu-get-shapes", sfu_get_shapes]
        for server_name, base_url in homeservers.items():
            self.argv += ["--homeserver", f"{server_name}={base_url}"]
        self.livekit_ws_url = livekit_ws_url
        self.port = 0
        self.process: Process | None = None

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

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
