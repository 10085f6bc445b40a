"""Trim Orb's full OpenAPI spec to what ``target-orb`` calls: ``/ingest`` and ``/ping``.

Usage::

    python tests/contract/trim_spec.py ../shared/orb/orb-openapi.json \\
        tests/contract/orb-openapi.ingest-ping.json

Keeps ``openapi``, ``info``, ``servers``, the top-level ``security``,
``components.securitySchemes``, the two paths, the ``tags`` those paths use,
and exactly the ``components`` they reference (``$ref`` followed
transitively). Nothing else is changed: no schema is edited. The output is
deterministic (sorted keys, indent 1, trailing newline), so re-running on the
same input gives a byte-identical file. Standard library only.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

KEPT_PATHS = ("/ingest", "/ping")
KEPT_TOP_LEVEL = ("openapi", "info", "servers", "security")


def _refs(node: Any) -> set[str]:
    """Every ``$ref`` string anywhere inside ``node``."""
    found: set[str] = set()
    stack = [node]
    while stack:
        cur = stack.pop()
        if isinstance(cur, dict):
            ref = cur.get("$ref")
            if isinstance(ref, str):
                found.add(ref)
            stack.extend(cur.values())
        elif isinstance(cur, list):
            stack.extend(cur)
    return found


def _resolve(spec: dict[str, Any], ref: str) -> tuple[str, str]:
    """``#/components/<section>/<name>`` -> (section, name); anything else is an error."""
    parts = ref.split("/")
    if len(parts) != 4 or parts[:2] != ["#", "components"]:
        raise ValueError(f"unsupported $ref {ref!r} (only #/components/<section>/<name>)")
    section, name = (p.replace("~1", "/").replace("~0", "~") for p in parts[2:])
    if name not in spec.get("components", {}).get(section, {}):
        raise ValueError(f"dangling $ref {ref!r}")
    return section, name


def trim(spec: dict[str, Any]) -> dict[str, Any]:
    missing = [p for p in KEPT_PATHS if p not in spec.get("paths", {})]
    if missing:
        raise ValueError(f"paths not in the spec: {missing}")
    out: dict[str, Any] = {k: spec[k] for k in KEPT_TOP_LEVEL if k in spec}
    out["paths"] = {p: spec["paths"][p] for p in KEPT_PATHS}

    components: dict[str, dict[str, Any]] = {}
    schemes = spec.get("components", {}).get("securitySchemes")
    if schemes:
        components["securitySchemes"] = schemes
    todo = sorted(_refs(out["paths"]))
    seen: set[str] = set()
    while todo:
        ref = todo.pop()
        if ref in seen:
            continue
        seen.add(ref)
        section, name = _resolve(spec, ref)
        node = spec["components"][section][name]
        components.setdefault(section, {})[name] = node
        todo.extend(sorted(_refs(node) - seen))
    out["components"] = components

    used_tags = {t for op in out["paths"].values() for o in op.values() for t in o.get("tags", [])}
    tags = [t for t in spec.get("tags", []) if t.get("name") in used_tags]
    if tags:
        out["tags"] = tags
    return out


def dump(spec: dict[str, Any]) -> str:
    return json.dumps(spec, sort_keys=True, indent=1, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("full_spec", type=Path, help="Orb's full OpenAPI JSON")
    parser.add_argument(
        "output",
        type=Path,
        nargs="?",
        default=Path(__file__).with_name("orb-openapi.ingest-ping.json"),
        help="where to write the trimmed spec (default: next to this script)",
    )
    args = parser.parse_args(argv)
    spec = json.loads(args.full_spec.read_text(encoding="utf-8"))
    trimmed = trim(spec)
    args.output.write_text(dump(trimmed), encoding="utf-8")
    names = {s: sorted(v) for s, v in trimmed["components"].items()}
    print(f"wrote {args.output}: paths {list(trimmed['paths'])}, components {names}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
