"""README's Install section says what CI tests and what the definition file supports."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from target_orb.target import TargetOrb

REPO = Path(__file__).resolve().parents[2]


def _install_section() -> str:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    match = re.search(r"^## Install\n(.*?)(?=^## )", readme, re.M | re.S)
    assert match, "README has no `## Install` section"
    return match.group(1)


def _ci_pythons() -> list[str]:
    ci = yaml.safe_load((REPO / ".github" / "workflows" / "ci.yml").read_text(encoding="utf-8"))
    return ci["jobs"]["test"]["strategy"]["matrix"]["python-version"]


def test_supported_pythons_are_the_ci_matrix(capsys):
    tested = _ci_pythons()
    pyproject = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    classifiers = re.findall(r'"Programming Language :: Python :: (3\.\d+)"', pyproject)
    assert classifiers == tested
    assert re.search(rf'^requires-python = ">={re.escape(tested[0])}"$', pyproject, re.M)
    TargetOrb.print_about("json")
    assert json.loads(capsys.readouterr().out)["supported_python_versions"] == tested
    assert f"Python {tested[0]}\u2013{tested[-1]} (the versions CI tests" in _install_section()


def test_install_gives_the_one_line_meltano_command_and_pip():
    section = _install_section()
    assert "meltano add target-orb --from-ref hub/target-orb.yml" in section
    # Meltano 4 reads `loader` there as a second plugin name (tests/e2e/test_meltano_add.py).
    assert "meltano add loader target-orb --from-ref" not in section
    assert "pip install" in section
