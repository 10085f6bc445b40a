"""Write hub/target-orb.yml, target-orb's plugin definition in Meltano Hub's format.

Generated from `target-orb --about --format json`, so the definition cannot drift from the
target's settings schema (tests/unit/test_hub_definition.py fails when it does):

    python hub/generate.py           # rewrite hub/target-orb.yml
    python hub/generate.py --check   # exit 1, with a diff, when the file is stale

Add target-orb to a Meltano project from it (no Hub entry needed):

    meltano add loader target-orb --from-ref hub/target-orb.yml

Not part of the installed package: a development tool, run from a clone.
"""

from __future__ import annotations

import argparse
import difflib
import json
import subprocess
import sys
import typing as t
from pathlib import Path

import yaml

HUB_FILE = Path(__file__).resolve().with_name("target-orb.yml")

# What `--about` does not say. No public repository yet: the Hub's `variant` is the GitHub
# owner of the repository and `repo`/`docs` its address; set REPO_OWNER (and regenerate)
# when the project is published.
REPO_OWNER = "your-github-org"
REPO_URL = f"https://github.com/{REPO_OWNER}/target-orb"
METADATA: dict[str, t.Any] = {
    "namespace": "target_orb",
    "variant": REPO_OWNER,
    "label": "Orb",
    "description": "Usage events for Orb billing, from Segment-shaped records",
    # The PyPI name (.github/workflows/release.yml publishes it). From a clone before the
    # first release, point pip_url at the checkout instead (README, Install).
    "pip_url": "target-orb",
    "executable": "target-orb",
    "repo": REPO_URL,
    "docs": f"{REPO_URL}#readme",
    "domain_url": "https://www.withorb.com",
    "maintenance_status": "beta",
    "keywords": ["meltano_sdk", "orb", "segment", "billing", "usage-based-billing"],
}

# Capabilities Meltano accepts for a loader (the `capabilities` enum of Meltano 4's
# meltano.schema.json); `--about` also advertises `validate-records`, which Meltano's project
# schema rejects for loaders (the setting `validate_records` is still listed).
LOADER_CAPABILITIES = frozenset(
    {
        "about",
        "stream-maps",
        "activate-version",
        "batch",
        "soft-delete",
        "hard-delete",
        "datatype-failsafe",
        "schema-flattening",
        "structured-logging",
    }
)

# JSON Schema type -> Meltano setting kind (an `enum` makes it `options`); the same mapping
# as tests/unit/test_meltano_yml.py, which checks this repository's meltano.yml.
KINDS = {
    "string": "string",
    "integer": "integer",
    "boolean": "boolean",
    "object": "object",
    "array": "array",
    "number": "decimal",
}

ABOUT_TIMEOUT = 60


def about() -> dict[str, t.Any]:
    """`target-orb --about --format json` of the target importable by this interpreter."""
    proc = subprocess.run(
        [sys.executable, "-m", "target_orb", "--about", "--format", "json"],
        capture_output=True,
        text=True,
        timeout=ABOUT_TIMEOUT,
        check=True,
    )
    return json.loads(proc.stdout)


def _types(prop: dict[str, t.Any]) -> list[str]:
    declared = prop.get("type")
    if declared is None:  # oneOf/anyOf of types (e.g. faker_config.locale)
        options = [o for o in prop.get("oneOf", prop.get("anyOf", [])) if isinstance(o, dict)]
        declared = [x for option in options for x in _as_list(option.get("type"))]
    return [x for x in dict.fromkeys(_as_list(declared)) if x != "null"]


def _as_list(value: str | list[str] | None) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def setting_kind(prop: dict[str, t.Any]) -> str:
    """The Meltano `kind` for one JSON Schema property.

    `object` and `array` matter: `meltano config set` parses their values as JSON
    (properties_mapping, event_types) instead of storing a string.
    """
    if "enum" in prop:
        return "options"
    kinds = _types(prop)
    if len(kinds) == 1:
        return KINDS[kinds[0]]
    # A value of several types (faker_config.seed: number|string|boolean): an array where one
    # of them is, else a string, which the plugin parses.
    return "array" if "array" in kinds else "string"


def _option_label(value: str) -> str:
    return value.replace("_", " ").capitalize()


def _fixed_object(prop: dict[str, t.Any]) -> bool:
    """An object with named properties and no schema for other keys: one setting per key.

    The Hub lists such settings by dotted name (`faker_config.seed`); a mapping of arbitrary
    keys (properties_mapping, stream_maps) stays one `kind: object` setting.
    """
    return (
        "object" in _types(prop)
        and bool(prop.get("properties"))
        and not isinstance(prop.get("additionalProperties"), dict)
    )


def _flatten(properties: dict[str, t.Any], prefix: str = "") -> t.Iterator[tuple[str, dict]]:
    for name, prop in properties.items():
        if _fixed_object(prop):
            yield from _flatten(prop["properties"], f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", prop


def setting(name: str, prop: dict[str, t.Any]) -> dict[str, t.Any]:
    """One Hub setting entry for a schema property."""
    entry: dict[str, t.Any] = {
        "name": name,
        "label": prop.get("title") or name,
        "description": " ".join(str(prop.get("description", "")).split()),
        "kind": setting_kind(prop),
    }
    # Only a default the target itself declares: Meltano passes `value` explicitly, so a
    # made-up one would override the target's own (the preset-dependent fields have none).
    if "default" in prop and prop["default"] is not None:
        entry["value"] = prop["default"]
    if "enum" in prop:
        entry["options"] = [{"label": _option_label(v), "value": v} for v in prop["enum"]]
    if prop.get("secret"):
        entry["sensitive"] = True
    return entry


def definition(about_json: dict[str, t.Any]) -> dict[str, t.Any]:
    """The Hub plugin definition for `--about --format json` output."""
    schema = about_json["settings"]
    settings = sorted(
        (setting(name, prop) for name, prop in _flatten(schema["properties"])),
        key=lambda s: s["name"],
    )
    return {
        "name": about_json["name"],
        **METADATA,
        "capabilities": sorted(c for c in about_json["capabilities"] if c in LOADER_CAPABILITIES),
        "settings": settings,
        # The schema's required settings. Which customer id field is needed depends on
        # `record_preset`; target-orb checks that itself and names the setting.
        "settings_group_validation": [sorted(schema.get("required", []))],
    }


HEADER = """\
# target-orb's plugin definition in Meltano Hub's format. GENERATED by hub/generate.py from
# `target-orb --about --format json`: do not edit by hand; change the settings schema
# (target_orb/settings.py) or hub/generate.py and run `python hub/generate.py`.
#
#   meltano add loader target-orb --from-ref hub/target-orb.yml
"""


def render(defn: dict[str, t.Any]) -> str:
    """YAML text of a definition, keys sorted as the Hub's files are."""
    body = yaml.safe_dump(defn, sort_keys=True, allow_unicode=True, width=100)
    return HEADER + body


def main(argv: list[str] | None = None) -> int:
    """Write or check hub/target-orb.yml; 1 when `--check` finds it stale."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare, do not write")
    args = parser.parse_args(argv)
    text = render(definition(about()))
    if not args.check:
        HUB_FILE.write_text(text, encoding="utf-8")
        return 0
    current = HUB_FILE.read_text(encoding="utf-8") if HUB_FILE.exists() else ""
    if current == text:
        return 0
    sys.stderr.writelines(
        difflib.unified_diff(
            current.splitlines(keepends=True),
            text.splitlines(keepends=True),
            str(HUB_FILE.name),
            "generated",
        )
    )
    sys.stderr.write("hub/target-orb.yml is stale: run `python hub/generate.py`\n")
    return 1


if __name__ == "__main__":
    sys.exit(main())
