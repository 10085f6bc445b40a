"""Release helpers for .github/workflows/release.yml: one version, notes from CHANGELOG.md.

The version is set in one place, pyproject.toml's `[project] version`; the installed package's
metadata carries it, and `target-orb --version` / `--about` read it from there.

    python tools/release.py version              # print pyproject.toml's version
    python tools/release.py check-tag v1.2.3 [DIST_FILE ...]
        # exit 1 unless the tag is `v` + that version and every built file carries it
    python tools/release.py notes 1.2.3 > notes.md
        # the CHANGELOG.md section `## [1.2.3] - YYYY-MM-DD`; exit 1 when there is none

To release: move CHANGELOG.md's `[Unreleased]` entries under `## [X.Y.Z] - YYYY-MM-DD`, set
`version = "X.Y.Z"` in pyproject.toml, commit, and push the tag `vX.Y.Z`.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = REPO / "pyproject.toml"
CHANGELOG = REPO / "CHANGELOG.md"

# A released section's heading in Keep a Changelog 1.1.0: `## [1.2.3] - 2026-12-07`.
_HEADING = re.compile(r"^## \[(?P<version>[^\]]+)\](?: - (?P<date>\d{4}-\d{2}-\d{2}))?\s*$", re.M)


def pyproject_version(text: str) -> str:
    """`version` of the `[project]` table (no TOML parser: tomllib is 3.11+, we support 3.10)."""
    match = re.search(r"^\[project\]\s*$(?P<body>.*?)(?=^\[|\Z)", text, re.M | re.S)
    if not match:
        raise ValueError("pyproject.toml has no [project] table")
    version = re.search(r'^version\s*=\s*"([^"]+)"\s*$', match.group("body"), re.M)
    if not version:
        raise ValueError("pyproject.toml: [project] sets no version (it must, statically)")
    return version.group(1)


def tag_problems(tag: str, version: str, dist_files: list[str]) -> list[str]:
    """What is wrong with releasing `tag` as `version` from these built files (empty: nothing)."""
    problems = []
    if tag != f"v{version}":
        problems.append(f"tag {tag!r} is not 'v' + pyproject.toml's version {version!r}")
    # Wheel and sdist names carry the version: target_orb-1.2.3-py3-none-any.whl,
    # target_orb-1.2.3.tar.gz.
    for name in (Path(f).name for f in dist_files):
        if not name.startswith(f"target_orb-{version}-") and name != f"target_orb-{version}.tar.gz":
            problems.append(f"{name} is not target-orb {version}")
    return problems


def release_notes(changelog: str, version: str) -> str:
    """The body of the changelog section of `version` (a dated, released section)."""
    headings = list(_HEADING.finditer(changelog))
    for i, heading in enumerate(headings):
        if heading.group("version") != version:
            continue
        if not heading.group("date"):
            raise ValueError(f"CHANGELOG.md: section [{version}] has no release date")
        end = headings[i + 1].start() if i + 1 < len(headings) else len(changelog)
        body = changelog[heading.end() : end]
        # Keep a Changelog's link references (`[1.2.3]: https://…`) close the file.
        body = re.split(r"^\[[^\]]+\]: ", body, maxsplit=1, flags=re.M)[0].strip()
        if not body:
            raise ValueError(f"CHANGELOG.md: section [{version}] is empty")
        return body + "\n"
    raise ValueError(
        f"CHANGELOG.md has no section `## [{version}] - YYYY-MM-DD`: move the [Unreleased] "
        "entries under it before tagging"
    )


def main(argv: list[str] | None = None) -> int:
    """Command line: version | check-tag TAG [DIST_FILE ...] | notes VERSION."""
    args = sys.argv[1:] if argv is None else argv
    try:
        version = pyproject_version(PYPROJECT.read_text(encoding="utf-8"))
        if args == ["version"]:
            sys.stdout.write(version + "\n")
            return 0
        if len(args) >= 2 and args[0] == "check-tag":
            problems = tag_problems(args[1], version, args[2:])
            for problem in problems:
                sys.stderr.write(f"release: {problem}\n")
            return 1 if problems else 0
        if len(args) == 2 and args[0] == "notes":
            sys.stdout.write(release_notes(CHANGELOG.read_text(encoding="utf-8"), args[1]))
            return 0
    except ValueError as exc:
        sys.stderr.write(f"release: {exc}\n")
        return 1
    sys.stderr.write(__doc__ or "")
    return 2


if __name__ == "__main__":
    sys.exit(main())
