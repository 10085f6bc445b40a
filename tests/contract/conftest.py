"""Fixtures for the contract test: Stoplight Prism, in proxy mode, in front of the stand-in Orb.

``prism proxy --errors SPEC UPSTREAM`` validates every request against Orb's own
OpenAPI spec (trimmed to ``/ingest`` and ``/ping``, see PROVENANCE.md) before
forwarding it, and every upstream response after; with ``--errors`` a violation
is answered with a Prism error (422 for a request, 500 ``VIOLATIONS`` for a
response) instead of being proxied, and logged as an ``error`` line.

Prism routes on the spec's bare paths (``/ingest``, ``/ping``): the ``servers``
base path ``/v1`` is not part of the route it listens on. So the target talks to
``http://127.0.0.1:<prism port>`` and Prism forwards to the stand-in's base URL
``http://127.0.0.1:<fake port>/v1`` + the path, i.e. ``/v1/ingest``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

CONTRACT_DIR = Path(__file__).resolve().parent
REPO_ROOT = CONTRACT_DIR.parents[1]
SPEC = CONTRACT_DIR / "orb-openapi.ingest-ping.json"
PRISM_BIN = CONTRACT_DIR / "node_modules" / ".bin" / "prism"
API_KEY = "test-orb-key"

NPM_CI_TIMEOUT_S = 300
PRISM_START_TIMEOUT_S = 60
PRISM_START_ATTEMPTS = 3

try:
    from fake_orb import FakeOrb
except ModuleNotFoundError:  # not installed into the venv: run from the checkout
    sys.path.insert(0, str(REPO_ROOT))
    from fake_orb import FakeOrb


def pinned_prism_version() -> str:
    pkg = json.loads((CONTRACT_DIR / "package.json").read_text(encoding="utf-8"))
    return pkg["dependencies"]["@stoplight/prism-cli"]


def _installed_prism_version() -> str | None:
    pkg = CONTRACT_DIR / "node_modules" / "@stoplight" / "prism-cli" / "package.json"
    try:
        return json.loads(pkg.read_text(encoding="utf-8"))["version"]
    except (OSError, ValueError, KeyError):
        return None


def _skip_or_fail(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set, so this is a failure, not a skip)", pytrace=False)
    pytest.skip(reason)


# --------------------------------------------------------------------------- Prism's log

# Lines Prism writes for anything but a clean, proxied exchange: "✖  error ..."
# (request/response violations with --errors, unresolved routes, security),
# "⚠  warning ..." and "Violation: ..." (validation findings it would let through).
_PROBLEM_RE = re.compile(r"\berror\b|\bwarn(ing)?\b|violation|✖|⚠", re.IGNORECASE)
_UPSTREAM_RE = re.compile(r"The upstream call to (\S+) has returned (\d{3})")


def prism_problems(log: str) -> list[str]:
    """Every line of a Prism log slice that reports an error, a warning or a violation."""
    return [line for line in log.splitlines() if _PROBLEM_RE.search(line)]


def upstream_statuses(log: str) -> list[tuple[str, int]]:
    """(path, status) of each response Prism received from the stand-in, in order."""
    return [(m.group(1), int(m.group(2))) for m in _UPSTREAM_RE.finditer(log)]


def requests_received(log: str) -> int:
    return sum("Request received" in line for line in log.splitlines())


# --------------------------------------------------------------------------- the harness


@dataclass
class PrismProxy:
    """A running ``prism proxy --errors`` in front of a running :class:`FakeOrb`."""

    url: str  # what target-orb's api_url is set to: http://127.0.0.1:PORT (no /v1)
    fake: FakeOrb
    log_path: Path
    proc: subprocess.Popen[bytes]
    version: str

    def mark(self) -> int:
        """The current end of Prism's log, for :meth:`log_since`."""
        return self.log_path.stat().st_size

    def log_since(self, mark: int, settle_s: float = 0.3) -> str:
        """Prism's log from ``mark`` on (after a short wait for its writes to land)."""
        time.sleep(settle_s)
        with self.log_path.open("rb") as fh:
            fh.seek(mark)
            return fh.read().decode("utf-8", "replace")

    def full_log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill(proc: subprocess.Popen[bytes]) -> None:
    """Stop Prism (it runs in its own process group, started by us) and reap it."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _start_prism(upstream: str, log_path: Path) -> tuple[subprocess.Popen[bytes], int]:
    """Start Prism on a free port; retry on a lost port race. Returns (process, port)."""
    last_log = ""
    for _attempt in range(PRISM_START_ATTEMPTS):
        port = _free_port()
        cmd = [
            str(PRISM_BIN), "proxy", "--errors",
            "-h", "127.0.0.1", "-p", str(port),
            str(SPEC), upstream,
        ]  # fmt: skip
        env = dict(os.environ, NO_COLOR="1", FORCE_COLOR="0")
        with log_path.open("ab") as log:
            proc = subprocess.Popen(
                cmd,
                cwd=CONTRACT_DIR,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # its own group: teardown takes down any child too
            )
        deadline = time.monotonic() + PRISM_START_TIMEOUT_S
        try:
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    break
                text = log_path.read_text(encoding="utf-8", errors="replace")
                if "Prism is listening on" in text and _port_open(port):
                    return proc, port
                time.sleep(0.2)
        except BaseException:
            _kill(proc)
            raise
        _kill(proc)
        last_log = log_path.read_text(encoding="utf-8", errors="replace")
        if "EADDRINUSE" not in last_log:
            break
    pytest.fail(
        f"Prism did not come up within {PRISM_START_TIMEOUT_S} s (exit code "
        f"{proc.returncode}); its log:\n{last_log[-4000:]}",
        pytrace=False,
    )


@pytest.fixture(scope="session")
def prism_bin() -> Path:
    """Prism, installed from the committed lockfile into tests/contract/node_modules."""
    missing = [tool for tool in ("node", "npm") if shutil.which(tool) is None]
    if missing:
        _skip_or_fail(f"the Prism contract test needs Node.js: {' and '.join(missing)} not on PATH")
    pinned = pinned_prism_version()
    if _installed_prism_version() != pinned or not PRISM_BIN.exists():
        cmd = ["npm", "ci", "--prefix", str(CONTRACT_DIR), "--no-audit", "--no-fund"]
        try:
            done = subprocess.run(
                cmd,
                cwd=CONTRACT_DIR,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=NPM_CI_TIMEOUT_S,
                check=False,
            )
        except subprocess.TimeoutExpired:
            pytest.fail(f"`{' '.join(cmd)}` took over {NPM_CI_TIMEOUT_S} s", pytrace=False)
        if done.returncode != 0:
            out = (done.stdout + done.stderr).decode("utf-8", "replace")
            pytest.fail(
                f"`{' '.join(cmd)}` failed ({done.returncode}):\n{out[-4000:]}", pytrace=False
            )
    installed = _installed_prism_version()
    if installed != pinned or not PRISM_BIN.exists():
        pytest.fail(f"expected @stoplight/prism-cli {pinned}, found {installed}", pytrace=False)
    return PRISM_BIN


@pytest.fixture(scope="session")
def prism(prism_bin: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrismProxy]:
    """``prism proxy --errors`` on a free loopback port, forwarding to a fresh FakeOrb."""
    fake = FakeOrb(api_key=API_KEY)
    fake.start()
    proc = None
    try:
        log_path = tmp_path_factory.mktemp("prism") / "prism.log"
        log_path.touch()
        proc, port = _start_prism(fake.url, log_path)
        yield PrismProxy(
            url=f"http://127.0.0.1:{port}",
            fake=fake,
            log_path=log_path,
            proc=proc,
            version=_installed_prism_version() or "?",
        )
    finally:
        if proc is not None:
            _kill(proc)
        fake.stop()


@pytest.fixture
def proxy(prism: PrismProxy) -> PrismProxy:
    """The session's Prism, with the stand-in reset and Prism still alive."""
    if prism.proc.poll() is not None:
        pytest.fail(f"Prism exited ({prism.proc.returncode}):\n{prism.full_log()[-4000:]}")
    prism.fake.reset()
    return prism
