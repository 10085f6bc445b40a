"""``python -m fake_orb``: the ``fake-orb`` command."""

from __future__ import annotations

import sys

from fake_orb.cli import main

sys.exit(main())
