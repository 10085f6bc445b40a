"""The built distributions stand on their own (issue 18).

`python -m build` makes the sdist and, from it, the wheel (so the sdist must be complete);
`twine check --strict` checks the metadata PyPI renders; the wheel carries the stand-in's
vendored schemas (fake_orb/data/*.json) and no tests; installed into a clean venv (the
checkout not importable), `target-orb --about`, `fake-orb --help` and a one-record run of
target-orb against `fake-orb` work from it.

TARGET_ORB_DIST=DIR checks the sdist and wheel already in DIR instead of building them (the
CI build job and the release workflow: the files checked are the files uploaded).
"""

from __future__ import annotations

import datetime as dt
import importlib.util
import json
import os
import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DATA_FILES = sorted(p.name for p in (REPO / "fake_orb" / "data").glob("*.json"))
SCRIPTS = {
    "target-orb": "target_orb.target:TargetOrb.cli",
    "fake-orb": "fake_orb.cli:main",
    "target-orb-deadletter": "target_orb.deadletter:main",
}
BUILD_TIMEOUT = 300
INSTALL_TIMEOUT = 600
CLI_TIMEOUT = 60
API_KEY = "wheel-test-key-SECRET-42"


def _release_tools():
    spec = importlib.util.spec_from_file_location("release_tools", REPO / "tools" / "release.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pyproject_version() -> str:
    """pyproject.toml's `[project] version`, the one place the version is set."""
    return _release_tools().pyproject_version((REPO / "pyproject.toml").read_text("utf-8"))


def _run(args: list[str], *, timeout: float, cwd: Path, env: dict | None = None):
    try:
        proc = subprocess.run(
            args, check=False, cwd=cwd, env=env, capture_output=True, text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"{' '.join(args)} still running after {timeout}s")
    return proc


def _ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, (
        f"{' '.join(map(str, proc.args))} exited {proc.returncode}\n"
        f"--- stdout ---\n{proc.stdout[-3000:]}\n--- stderr ---\n{proc.stderr[-6000:]}"
    )
    return proc


@pytest.fixture(scope="session")
def dists(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """{"sdist": ..., "wheel": ...}: built here, or taken from TARGET_ORB_DIST."""
    given = os.environ.get("TARGET_ORB_DIST")
    if given:
        outdir = Path(given)
    else:
        outdir = tmp_path_factory.mktemp("dist")
        # Default `python -m build`: the sdist first, then the wheel built from the sdist.
        _ok(_run([sys.executable, "-m", "build", "--outdir", str(outdir), str(REPO)],
                 timeout=BUILD_TIMEOUT, cwd=outdir))
    version = pyproject_version()
    sdists = sorted(outdir.glob("target_orb-*.tar.gz"))
    wheels = sorted(outdir.glob("target_orb-*.whl"))
    assert [p.name for p in sdists] == [f"target_orb-{version}.tar.gz"], sdists
    assert [p.name for p in wheels] == [f"target_orb-{version}-py3-none-any.whl"], wheels
    return {"sdist": sdists[0], "wheel": wheels[0]}


def _wheel_names(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as zf:
        return zf.namelist()


def test_twine_check_passes(dists):
    proc = _ok(_run([sys.executable, "-m", "twine", "check", "--strict",
                     str(dists["sdist"]), str(dists["wheel"])],
                    timeout=CLI_TIMEOUT, cwd=dists["wheel"].parent))
    assert proc.stdout.count("PASSED") == 2, proc.stdout


def test_wheel_carries_the_stand_ins_data_and_no_tests(dists):
    names = _wheel_names(dists["wheel"])
    assert DATA_FILES, "fake_orb/data has no JSON files"
    assert sorted(n.removeprefix("fake_orb/data/") for n in names
                  if n.startswith("fake_orb/data/")) == DATA_FILES
    assert [n for n in names if n.startswith("tests/") or "/tests/" in n] == []
    top = {n.split("/", 1)[0] for n in names}
    assert top == {"target_orb", "fake_orb", f"target_orb-{pyproject_version()}.dist-info"}, top
    modules = {p.name for p in (REPO / "target_orb").glob("*.py")}
    assert {n.removeprefix("target_orb/") for n in names
            if re.fullmatch(r"target_orb/[^/]+\.py", n)} == modules
    standin = {p.relative_to(REPO).as_posix() for p in (REPO / "fake_orb").rglob("*.py")}
    assert {n for n in names if n.startswith("fake_orb/") and n.endswith(".py")} == standin
    assert "fake_orb/RULES.md" in names


def test_wheel_metadata(dists):
    with zipfile.ZipFile(dists["wheel"]) as zf:
        info = f"target_orb-{pyproject_version()}.dist-info"
        metadata = zf.read(f"{info}/METADATA").decode()
        entry_points = zf.read(f"{info}/entry_points.txt").decode()
    assert f"\nVersion: {pyproject_version()}\n" in metadata
    assert "\nRequires-Python: >=3.10\n" in metadata
    assert "\nDescription-Content-Type: text/markdown\n" in metadata
    for script, target in SCRIPTS.items():
        assert f"{script} = {target}" in entry_points


def test_sdist_has_what_the_wheel_is_built_from(dists):
    with tarfile.open(dists["sdist"]) as tf:
        names = {n.split("/", 1)[1] for n in tf.getnames() if "/" in n}
    for needed in ("pyproject.toml", "README.md", "target_orb/__init__.py",
                   "fake_orb/__init__.py", *(f"fake_orb/data/{n}" for n in DATA_FILES)):
        assert needed in names, needed
    assert not any(n.startswith((".venv/", "node_modules/")) or "/node_modules/" in n
                   for n in names)


@pytest.fixture(scope="session")
def clean_venv(dists, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new venv with only the wheel (and its dependencies) installed; returns its bin dir."""
    root = tmp_path_factory.mktemp("wheel-venv")
    venv = root / "venv"
    _ok(_run([sys.executable, "-m", "venv", str(venv)], timeout=CLI_TIMEOUT, cwd=root))
    bindir = venv / ("Scripts" if os.name == "nt" else "bin")
    _ok(_run([str(bindir / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check",
              str(dists["wheel"])], timeout=INSTALL_TIMEOUT, cwd=root))
    return bindir


def _clean_env() -> dict[str, str]:
    # Nothing that would let the checkout or a developer's settings leak in.
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("TARGET_ORB_", "PYTHON", "VIRTUAL_ENV"))}


def test_installed_from_the_wheel_not_the_checkout(clean_venv, tmp_path):
    proc = _ok(_run([str(clean_venv / "python"), "-c",
                     "import target_orb, pathlib; print(pathlib.Path(target_orb.__file__))"],
                    timeout=CLI_TIMEOUT, cwd=tmp_path, env=_clean_env()))
    location = Path(proc.stdout.strip())
    assert clean_venv.parent in location.parents, location
    assert REPO not in location.parents


def test_about_and_version_from_the_wheel(clean_venv, tmp_path):
    about = json.loads(_ok(_run([str(clean_venv / "target-orb"), "--about", "--format", "json"],
                                timeout=CLI_TIMEOUT, cwd=tmp_path, env=_clean_env())).stdout)
    assert about["name"] == "target-orb"
    assert about["version"] == pyproject_version()
    assert "api_key" in about["settings"]["required"]
    version = _ok(_run([str(clean_venv / "target-orb"), "--version"],
                       timeout=CLI_TIMEOUT, cwd=tmp_path, env=_clean_env())).stdout
    assert f"target-orb v{pyproject_version()}" in version


def test_fake_orb_help_from_the_wheel(clean_venv, tmp_path):
    out = _ok(_run([str(clean_venv / "fake-orb"), "--help"],
                   timeout=CLI_TIMEOUT, cwd=tmp_path, env=_clean_env())).stdout
    assert out.startswith("usage: fake-orb")
    assert "--events-out" in out


def test_one_record_run_against_fake_orb_from_the_wheel(clean_venv, tmp_path):
    """fake-orb (validating against the wheel's vendored schemas) runs target-orb once."""
    when = (dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)).strftime(
        "%Y-%m-%dT%H:%M:%S.%fZ")
    record = {"type": "track", "messageId": "wheel-1", "userId": "cust_1",
              "event": "API Request", "timestamp": when, "properties": {"tokens": 7}}
    lines = [
        {"type": "SCHEMA", "stream": "tracks", "key_properties": ["messageId"],
         "schema": {"type": "object", "properties": {"messageId": {"type": "string"}}}},
        {"type": "RECORD", "stream": "tracks", "record": record},
        {"type": "STATE", "value": {"bookmarks": {"tracks": {"seq": 1}}}},
    ]
    (tmp_path / "in.singer").write_text("".join(json.dumps(m) + "\n" for m in lines))
    config = {"external_customer_id_field": "userId", "properties_mapping": {"tokens": "tokens"},
              "dead_letter_path": str(tmp_path / "dead-letter.jsonl")}
    (tmp_path / "config.json").write_text(json.dumps(config))
    events_out = tmp_path / "landed.jsonl"
    # fake-orb hands target-orb its URL and key as TARGET_ORB_API_URL/_API_KEY (--config ENV).
    proc = _ok(_run(
        [str(clean_venv / "fake-orb"), "--host", "127.0.0.1", "--port", "0",
         "--api-key", API_KEY, "--events-out", str(events_out), "--max-seconds", "60",
         "--", str(clean_venv / "target-orb"), "--config", "ENV", "--config", "config.json",
         "--input", "in.singer"],
        timeout=CLI_TIMEOUT + 30, cwd=tmp_path, env=_clean_env()))
    landed = [json.loads(line) for line in events_out.read_text().splitlines() if line]
    assert [(e["idempotency_key"], e["event_name"], e["external_customer_id"], e["properties"])
            for e in landed] == [("wheel-1", "API Request", "cust_1", {"tokens": 7})]
    assert '{"bookmarks":{"tracks":{"seq":1}}}' in proc.stdout  # STATE after the 200
    assert "events landed: 1" in proc.stdout
    assert API_KEY not in proc.stdout + proc.stderr
    assert not (tmp_path / "dead-letter.jsonl").exists()
