"""Entry point for `python -m target_orb`."""

from __future__ import annotations

from target_orb.target import TargetOrb

TargetOrb.cli()
