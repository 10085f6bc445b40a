"""meltano.yml's target-orb settings stay in step with `target-orb --about` (the schema)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from target_orb.settings import CONFIG_SCHEMA
from target_orb.target import TargetOrb

MELTANO_YML = Path(__file__).resolve().parents[2] / "meltano.yml"

# JSON Schema type -> Meltano setting kind (an `enum` makes it `options`).
_KINDS = {"string": "string", "integer": "integer", "boolean": "boolean", "object": "object",
          "array": "array", "number": "decimal"}


def _about_settings(capsys) -> dict[str, dict]:
    TargetOrb.print_about("json")
    return json.loads(capsys.readouterr().out)["settings"]["properties"]


def _meltano_settings() -> dict[str, dict]:
    project = yaml.safe_load(MELTANO_YML.read_text(encoding="utf-8"))
    (loader,) = [p for p in project["plugins"]["loaders"] if p["name"] == "target-orb"]
    return {s["name"]: s for s in loader["settings"]}


def _expected_kind(prop: dict) -> str:
    if "enum" in prop:
        return "options"
    kinds = [k for k in prop["type"] if k != "null"]
    assert len(kinds) == 1, prop
    return _KINDS[kinds[0]]


def _meltano_entry(name: str, prop: dict) -> dict:
    """The meltano.yml entry for a schema property (what a new setting should get)."""
    entry: dict = {"name": name, "kind": _expected_kind(prop)}
    if prop.get("secret"):
        entry["sensitive"] = True
    if "default" in prop:
        entry["value"] = prop["default"]
    entry["label"] = prop.get("title", name)
    entry["description"] = prop.get("description", "")
    if "enum" in prop:
        entry["options"] = [{"label": v.replace("_", " ").capitalize(), "value": v}
                            for v in prop["enum"]]
    return entry


def test_every_target_orb_setting_is_in_meltano_yml():
    schema = CONFIG_SCHEMA["properties"]
    missing = sorted(set(schema) - set(_meltano_settings()))
    snippet = yaml.safe_dump([_meltano_entry(n, schema[n]) for n in missing], sort_keys=False,
                             allow_unicode=True, width=90)
    assert missing == [], (
        f"meltano.yml lacks target-orb settings {missing}; add them under the target-orb "
        f"loader's `settings:` (generated from the schema):\n{snippet}"
    )


def test_meltano_yml_names_only_settings_the_target_knows(capsys):
    unknown = sorted(set(_meltano_settings()) - set(_about_settings(capsys)))
    assert unknown == [], f"meltano.yml lists settings target-orb does not have: {unknown}"


@pytest.mark.parametrize("name", sorted(_meltano_settings()))
def test_meltano_yml_setting_matches_about(name, capsys):
    setting = _meltano_settings()[name]
    prop = _about_settings(capsys)[name]
    assert setting.get("kind") == _expected_kind(prop), name
    # The default: Meltano passes `value` explicitly, so it must be the target's own default
    # (and absent where the target has none, e.g. the preset-dependent mapping fields).
    assert setting.get("value") == prop.get("default"), name
    if "enum" in prop:
        assert [o["value"] for o in setting.get("options", [])] == prop["enum"], name
    assert bool(setting.get("sensitive")) == bool(prop.get("secret")), name
