"""`make demo` keeps working: the README's first command runs the operators' envoy.yaml end to end.

The demo runs as a subprocess, as a user runs it, on free ports so it never collides
with a stack already up on envoy.yaml's default ports.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import requires_standins, requires_wasm  # requires_standins: the real LiveKit stack

DEMO = Path(__file__).resolve().parent / "demo.py"


def run_demo(run_dir: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(DEMO), "--free-ports", "--run-dir", str(run_dir), *args],
        capture_output=True, text=True, timeout=timeout,
    )


def _line(output: str, *parts: str) -> str:
    """The one output line containing every part, so a failure shows what was printed instead."""
    lines = [line for line in output.splitlines() if all(part in line for part in parts)]
    assert len(lines) == 1, f"expected one line with {parts!r} in:\n{output}"
    return lines[0]


@requires_wasm
@requires_standins
def test_demo_walks_through_the_limit(tmp_path):
    result = run_demo(tmp_path / "demo")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output

    assert "-> 200" in _line(output, "alice (device A1)", "POST /sfu/get")
    assert "-> 200" in _line(output, "bob   (device B1)", "POST /get_token")
    _line(output, "carol (device C1)", '-> 403 {"errcode":"M_FORBIDDEN","error":"This voice channel is full."}')
    assert "-> 200 let in: alice is already in the call" in _line(output, "alice (device A2, second device)")
    # LiveKit itself lists alice's two devices and bob, all connected by real clients.
    listings = [line for line in output.splitlines() if "LiveKit lists" in line]
    assert len(listings) == 3, output
    assert "3 participants" in listings[0] and "@alice:test.local:A2" in listings[0]
    assert "@carol:test.local:C1" not in listings[0] and "@carol:test.local:C1" in listings[1]
    _line(output, "bob   (device B1) leaves the call")
    _line(output, "carol (device C1)", "-> 200 token issued: bob's place is free")
    assert "-> 200" in _line(output, "OPTIONS /sfu/get")
    # Current clients, through Synapse's application-service proxy and the guard.
    rtc = "POST /_matrix/client/v1/rtc/livekit/get_token (Synapse)"
    assert "-> 200" in _line(output, "erin  (member E1)", rtc)
    assert "-> 200" in _line(output, "frank (member F1)", rtc)
    _line(output, "grace (member G1)", rtc, '-> 403 {"errcode":"M_FORBIDDEN","error":"This voice channel is full."}')
    assert "-> 200 let in: erin is already in the call" in _line(output, "erin  (member E2)", rtc)
    assert "3 participants" in listings_after(output, "Call through Synapse")
    assert "wasmcustom.voice_limit_guard.blocked: 2" in output
    assert "wasmcustom.voice_limit_guard.untrusted_requests: 0" in output
    assert "All steps answered as expected" in output
    assert "UNEXPECTED" not in output
    assert f"Logs: {tmp_path / 'demo'}/" in output
    assert _processes_using(tmp_path / "demo") == [], "the demo left processes running"


def listings_after(output: str, marker: str) -> str:
    """The first "LiveKit lists" line printed after the line holding ``marker``."""
    rest = output[output.index(marker):]
    return next(line for line in rest.splitlines() if "LiveKit lists" in line)


def _processes_using(run_dir: Path) -> list[str]:
    """Processes with a log file or working directory inside ``run_dir``: what the demo started.

    Every component writes its log there, so anything still holding a file in it
    outlived the demo.
    """
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            paths = [str((proc / "cwd").resolve())]
            paths += [str(fd.resolve()) for fd in (proc / "fd").iterdir()]
            if any(path.startswith(str(run_dir)) for path in paths):
                argv = (proc / "cmdline").read_bytes().split(b"\0")
                found.append(f"{proc.name}: {b' '.join(argv).decode(errors='replace')}")
        except OSError:
            continue  # gone meanwhile, or not ours to inspect
    return found
