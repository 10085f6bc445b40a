"""Static types: mypy over target_orb with the settings in pyproject.toml ([tool.mypy]).

Run here so the README's one test command (and CI) type-checks the package; every
`type: ignore[code]` must still be needed (`warn_unused_ignores`).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_mypy_finds_no_type_errors():
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--no-error-summary"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
