"""Copy the request schemas the stand-in Orb validates (besides ingest) out of Orb's spec.

Usage (from the repository root)::

    python tests/fake_orb/vendor_orb_schemas.py ../shared/orb/orb-openapi.json \\
        fake_orb/data/orb_request_schemas.json

Keeps ``EventSearchCriteria``, ``NewBackfill``, ``AmendedEvent`` and ``EditCustomer``
from ``components.schemas`` plus every schema they reference (``$ref`` followed
transitively), under ``$defs``, with ``#/components/schemas/X`` rewritten to
``#/$defs/X``. Nothing else is changed. Deterministic output (sorted keys, indent 1,
trailing newline). Standard library only.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOTS = ("EventSearchCriteria", "NewBackfill", "AmendedEvent", "EditCustomer")
PREFIX = "#/components/schemas/"
COMMENT = (
    "Copied from Orb's OpenAPI 3.1 spec, orbcorp/orb-python commit "
    "604050c257ef97a4b655e5ae6b7c15c2c3fb3d7c (release 4.69.0), scripts/mock, "
    "components.schemas: {roots} and what they reference; $refs rewritten to #/$defs/. "
    "Made by tests/fake_orb/vendor_orb_schemas.py."
)


def _rewrite(node: Any, found: set[str]) -> Any:
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            if k == "$ref" and isinstance(v, str) and v.startswith(PREFIX):
                name = v[len(PREFIX) :]
                found.add(name)
                out[k] = "#/$defs/" + name
            else:
                out[k] = _rewrite(v, found)
        return out
    if isinstance(node, list):
        return [_rewrite(x, found) for x in node]
    return node


def vendor(spec: dict[str, Any]) -> dict[str, Any]:
    schemas = spec["components"]["schemas"]
    defs: dict[str, Any] = {}
    todo = list(ROOTS)
    while todo:
        name = todo.pop()
        if name in defs:
            continue
        found: set[str] = set()
        defs[name] = _rewrite(schemas[name], found)
        todo.extend(sorted(found - set(defs)))
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$comment": COMMENT.format(roots=", ".join(ROOTS)),
        "$defs": defs,
    }


def render(spec: dict[str, Any]) -> str:
    return json.dumps(vendor(spec), indent=1, sort_keys=True, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("spec", type=Path)
    p.add_argument("out", type=Path)
    args = p.parse_args(argv)
    spec = json.loads(args.spec.read_text(encoding="utf-8"))
    args.out.write_text(render(spec), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
