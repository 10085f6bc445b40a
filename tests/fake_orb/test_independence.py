"""The stand-in stays independent of the target, its vendored schemas stay Orb's, and
its CLI summary tells a person what happened."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from .vendor_orb_schemas import render

REPO_ROOT = Path(__file__).resolve().parents[2]
STANDIN = sorted((REPO_ROOT / "fake_orb").rglob("*.py"))
TARGET = sorted((REPO_ROOT / "target_orb").rglob("*.py"))


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, relative imports resolved against its package."""
    package = path.relative_to(REPO_ROOT).parent.parts
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = list(package[: len(package) - node.level + 1]) if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            names.add(module)
            # `from package import module` imports that module too.
            names |= {f"{module}.{a.name}" for a in node.names}
    return names


def _offenders(files: list[Path], forbidden: str) -> dict[str, list[str]]:
    out = {}
    for path in files:
        bad = sorted(
            n for n in _imports(path) if n == forbidden or n.startswith(forbidden + ".")
        )
        if bad:
            out[str(path.relative_to(REPO_ROOT))] = bad
    return out


def test_the_stand_in_imports_nothing_from_target_orb() -> None:
    own = {p.relative_to(REPO_ROOT).as_posix() for p in STANDIN}
    assert {"fake_orb/__init__.py", "fake_orb/core.py", "fake_orb/common.py"} <= own
    assert _offenders(STANDIN, "target_orb") == {}


def test_target_orb_never_imports_the_stand_in() -> None:
    assert any(p.name == "target.py" for p in TARGET)
    assert _offenders(TARGET, "fake_orb") == {}


def test_the_stand_in_runs_without_target_orb() -> None:
    """Imported and started in a fresh interpreter where ``target_orb`` cannot be imported."""
    code = textwrap.dedent(
        """
        import sys
        sys.modules["target_orb"] = None  # any import of target_orb now raises ImportError
        import fake_orb
        import fake_orb.cli
        with fake_orb.FakeOrb() as orb:
            assert orb.url.endswith("/v1")
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True, text=True, timeout=30, cwd=REPO_ROOT, check=False,
    )
    assert proc.returncode == 0, proc.stderr


def _shared_spec() -> Path | None:
    for parent in REPO_ROOT.parents:
        candidate = parent / "shared" / "orb" / "orb-openapi.json"
        if candidate.is_file():
            return candidate
    return None


def test_vendored_request_schemas_are_orbs() -> None:
    spec = _shared_spec()
    if spec is None:
        pytest.skip("Orb's spec (shared/orb/orb-openapi.json beside the repo) is not here")
    vendored = REPO_ROOT / "fake_orb" / "data" / "orb_request_schemas.json"
    expected = render(json.loads(spec.read_text(encoding="utf-8")))
    assert vendored.read_text(encoding="utf-8") == expected, (
        "regenerate with tests/fake_orb/vendor_orb_schemas.py"
    )


CHILD = textwrap.dedent(
    """
    import json, os, urllib.request
    url = os.environ["TARGET_ORB_API_URL"]
    auth = {"Authorization": "Bearer " + os.environ["TARGET_ORB_API_KEY"],
            "Content-Type": "application/json"}
    def call(method, path, body):
        req = urllib.request.Request(url + path, data=json.dumps(body).encode(),
                                     headers=auth, method=method)
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.load(resp)
    call("PUT", "/customers/external_customer_id/acct%2F1", {"metadata": {"gold": "true"}})
    bf = call("POST", "/events/backfills", {"timeframe_start": "2030-01-01T00:00:00Z",
              "timeframe_end": "2030-01-10T00:00:00Z", "replace_existing_events": False})
    ev = {"idempotency_key": "h1", "external_customer_id": "acct/1", "event_name": "e",
          "timestamp": "2030-01-05T00:00:00Z", "properties": {"n": 1}}
    call("POST", "/ingest?backfill_id=" + bf["id"], {"events": [ev]})
    call("POST", "/events/backfills/" + bf["id"] + "/close", {})
    call("PUT", "/events/h1", {k: v for k, v in ev.items() if k != "idempotency_key"}
         | {"properties": {"n": 2}})
    """
)


def test_cli_summary_shows_backfills_corrections_and_metadata() -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fake_orb",
            "--now",
            "2030-01-15T12:00:00Z",
            "--customer",
            "acct/1",
            "--",
            sys.executable,
            "-c",
            CHILD,
        ],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO_ROOT,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "events landed: 1" in out
    assert "backfills: 1" in out
    assert (
        "  fake_bf_1 reflected 2030-01-01T00:00:00Z..2030-01-10T00:00:00Z events=1 "
        "replace=false customer_id=None close_time=2030-01-15T12:00:00Z"
    ) in out
    assert "corrected events: 1" in out
    assert '  h1: amended, 1 amendment(s); current {"idempotency_key":"h1"' in out
    assert "customers: 1 (1 update(s))" in out
    assert '  acct/1 (fake_cus_1) metadata {"gold":"true"}' in out
