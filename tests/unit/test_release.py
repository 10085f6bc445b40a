"""tools/release.py: the tag must be the version, and the release notes come from CHANGELOG.md."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


def _load():
    spec = importlib.util.spec_from_file_location("release_tools", REPO / "tools" / "release.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["release_tools"] = module
    spec.loader.exec_module(module)
    return module


release = _load()

CHANGELOG = """\
# Changelog

## [Unreleased]

### Added
- Something new.

## [1.2.0] - 2027-01-15

### Added
- Backfills resume.

### Fixed
- A retry bug.

## [1.1.0] - 2026-12-20

### Added
- First release.

[Unreleased]: https://example.invalid/compare/v1.2.0...HEAD
[1.2.0]: https://example.invalid/compare/v1.1.0...v1.2.0
"""


def test_notes_are_the_versions_section_only():
    assert release.release_notes(CHANGELOG, "1.2.0") == (
        "### Added\n- Backfills resume.\n\n### Fixed\n- A retry bug.\n"
    )
    # the last section stops before the link references
    assert release.release_notes(CHANGELOG, "1.1.0") == "### Added\n- First release.\n"


@pytest.mark.parametrize(("version", "message"), [
    ("1.3.0", "no section `## [1.3.0] - YYYY-MM-DD`"),
    ("Unreleased", "has no release date"),
    ("1.2", "no section"),
])
def test_no_notes_for_a_version_without_a_dated_section(version, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        release.release_notes(CHANGELOG, version)


def test_tag_must_be_v_plus_the_version_and_match_the_built_files():
    ok = ["dist/target_orb-1.2.0-py3-none-any.whl", "dist/target_orb-1.2.0.tar.gz"]
    assert release.tag_problems("v1.2.0", "1.2.0", ok) == []
    assert release.tag_problems("1.2.0", "1.2.0", ok) == [
        "tag '1.2.0' is not 'v' + pyproject.toml's version '1.2.0'"
    ]
    assert release.tag_problems("v1.2.1", "1.2.0", []) != []
    assert release.tag_problems("v1.2.0", "1.2.0", ["target_orb-1.2.01.tar.gz"]) == [
        "target_orb-1.2.01.tar.gz is not target-orb 1.2.0"
    ]


def test_version_is_read_from_the_project_table_only():
    text = '[build-system]\nversion = "9"\n\n[project]\nname = "x"\nversion = "0.3.1"\n\n[tool.x]\n'
    assert release.pyproject_version(text) == "0.3.1"
    with pytest.raises(ValueError, match="sets no version"):
        release.pyproject_version(
            '[project]\nname = "x"\ndynamic = ["version"]\n[tool.y]\nversion = "1"\n'
        )


def test_the_repositorys_version_and_changelog():
    version = release.pyproject_version((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    assert re.fullmatch(r"\d+\.\d+\.\d+", version)
    changelog = (REPO / "CHANGELOG.md").read_text(encoding="utf-8")
    assert changelog.startswith("# Changelog\n")
    assert "\n## [Unreleased]\n" in changelog
    headings = re.findall(r"^## \[([^\]]+)\](.*)$", changelog, re.M)
    for name, rest in headings:  # Keep a Changelog: [Unreleased], or [X.Y.Z] - YYYY-MM-DD
        assert name == "Unreleased" or re.fullmatch(r" - \d{4}-\d{2}-\d{2}", rest), name
    released = [name for name, _ in headings if name != "Unreleased"]
    # pyproject's version is the newest release, or the next one (not released yet).
    if version in released:
        assert released[0] == version, (released, version)


def test_cli(capsys):
    assert release.main(["version"]) == 0
    assert re.fullmatch(r"\d+\.\d+\.\d+\n", capsys.readouterr().out)
    assert release.main(["check-tag", "v0.0.0-nope"]) == 1
    assert "is not 'v' + pyproject.toml's version" in capsys.readouterr().err
    assert release.main(["bogus"]) == 2


def test_release_workflow_uses_these_checks():
    workflow = yaml.safe_load((REPO / ".github" / "workflows" / "release.yml").read_text())
    text = yaml.safe_dump(workflow)
    assert "tools/release.py check-tag" in text
    assert "tools/release.py notes" in text
    assert workflow[True]["push"]["tags"] == ["v*"]  # YAML 1.1 reads `on:` as True
    (publish,) = [j for j in workflow["jobs"].values()
                  if any("gh-action-pypi-publish" in s.get("uses", "") for s in j["steps"])]
    assert publish["permissions"] == {"id-token": "write"}
    assert publish["environment"]["name"] == "pypi"
    assert "password" not in text and "PYPI_TOKEN" not in text.upper()
