"""The README's Meltano quick start, run exactly as written on a fresh Meltano project.

The commands are read from README.md between `<!-- meltano-quickstart:start -->` and
`<!-- meltano-quickstart:end -->` (every ```bash block there, in order) and run as one bash
script with `set -euo pipefail`, in a temp folder that holds the clone as `target-orb/` (a
symlink to this checkout), as the README says. Meltano 4 comes from the test extra; Meltano
installs target-orb from the clone and `tap-jsonl` from PyPI into plugin venvs of its own.
Without Meltano this test skips locally and FAILS in CI (`CI` set), like the other e2e tests.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import typing as t
from pathlib import Path

import pytest

from tests.e2e.meltano_harness import find_meltano

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
SAMPLE = REPO / "demo" / "segment-archive-sample.jsonl"
PROJECT = "orb-quickstart"
TIMEOUT = 900  # two plugin installs and one `meltano run`; about 30 s with warm caches

_BLOCK = re.compile(
    r"<!-- meltano-quickstart:start -->\n(.*?)<!-- meltano-quickstart:end -->", re.S
)
_BASH = re.compile(r"```bash\n(.*?)```", re.S)


def quickstart_commands(readme: str) -> str:
    """The bash of the README's quick start, exactly as written."""
    match = _BLOCK.search(readme)
    assert match, "README lacks the meltano-quickstart markers"
    blocks = _BASH.findall(match.group(1))
    assert blocks, "no ```bash block between the meltano-quickstart markers"
    return "".join(blocks)


def _sendable_keys() -> set[str]:
    rows = [json.loads(line) for line in SAMPLE.read_text().splitlines() if line.strip()]
    return {
        r["messageId"] for r in rows
        if r["type"] == "track" and r.get("userId")
        and r.get("integrations", {}).get("Orb", r.get("integrations", {}).get("All", True))
    }


def test_the_commands_are_found_and_use_the_hub_definition():
    script = quickstart_commands(README.read_text(encoding="utf-8"))
    assert "meltano init" in script
    assert "--from-ref ../target-orb/hub/target-orb.yml" in script
    assert "meltano add --custom" not in script  # declares no settings (issue 19)
    assert "meltano config target-orb" not in script  # Meltano 3 syntax


def _run(script: str, cwd: Path, meltano: str) -> subprocess.CompletedProcess[str]:
    env = {
        k: v for k, v in os.environ.items()
        if not k.startswith(("TARGET_ORB_", "TAP_SEGMENT_", "MELTANO_", "VIRTUAL_ENV"))
    }
    env["PATH"] = os.pathsep.join([str(Path(meltano).parent), env.get("PATH", "")])
    env["MELTANO_SEND_ANONYMOUS_USAGE_STATS"] = "false"
    proc = subprocess.Popen(
        ["bash", "-c", "set -euo pipefail\n" + script],
        cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"the README's quick start still ran after {TIMEOUT}s\n{err[-6000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _landed(stdout: str) -> list[dict[str, t.Any]]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def test_the_meltano_quick_start_runs_as_written(tmp_path):
    meltano = find_meltano()
    if meltano is None:
        reason = "meltano is not installed (next to the interpreter or on PATH): pip install " \
            "-e '.[test]'"
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the README quick start: {reason}")
        pytest.skip(reason)
    (tmp_path / "target-orb").symlink_to(REPO, target_is_directory=True)
    script = quickstart_commands(README.read_text(encoding="utf-8"))
    result = _run(script, tmp_path, meltano)
    assert result.returncode == 0, (
        f"--- stdout (tail) ---\n{result.stdout[-4000:]}\n--- stderr (tail) ---\n"
        f"{result.stderr[-8000:]}"
    )
    # The stand-in's summary (stdout): every sendable Track of the sample landed once.
    landed = _landed(result.stdout)
    assert {e["idempotency_key"] for e in landed} == _sendable_keys()
    assert f"events landed: {len(_sendable_keys())}" in result.stdout
    assert "keys sent again (Orb kept the first copy): 0" in result.stdout
    # The settings set with `meltano config set` reached the target: the mapping (given as
    # JSON text) and the customer field; the key came from the environment.
    api = [e for e in landed if e["event_name"] == "API Request"]
    assert api and all(set(e["properties"]) == {"tokens", "endpoint"} for e in api)
    assert "target-orb summary" in result.stderr
    assert "Config validation failed" not in result.stderr
    project = tmp_path / PROJECT
    dead = (project / "target-orb-dead-letter.jsonl").read_text().splitlines()
    assert len(dead) == 1  # the anonymous API Request: no userId
    # `.env` holds the key for real runs; the stand-in's variable wins for this one.
    env_file = (project / ".env").read_text()
    assert "TARGET_ORB_API_KEY=" in env_file
    assert "test-orb-key" not in env_file
