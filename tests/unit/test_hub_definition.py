"""hub/target-orb.yml (Meltano Hub plugin definition) is what hub/generate.py makes of --about."""

from __future__ import annotations

import importlib.metadata
import importlib.resources
import importlib.util
import json
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from target_orb.target import TargetOrb

REPO = Path(__file__).resolve().parents[2]
HUB_FILE = REPO / "hub" / "target-orb.yml"
MELTANO_SCHEMA = importlib.resources.files("meltano") / "schemas" / "meltano.schema.json"
# Keys only the Hub reads; `meltano add --from-ref` leaves them out of meltano.yml.
HUB_ONLY = {"keywords", "maintenance_status", "domain_url"}


def _generator():
    spec = importlib.util.spec_from_file_location("hub_generate", REPO / "hub" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["hub_generate"] = module
    spec.loader.exec_module(module)
    return module


gen = _generator()


@pytest.fixture
def about(capsys) -> dict:
    TargetOrb.print_about("json")
    return json.loads(capsys.readouterr().out)


def _hub() -> dict:
    return yaml.safe_load(HUB_FILE.read_text(encoding="utf-8"))


def _settings(defn: dict) -> dict[str, dict]:
    return {s["name"]: s for s in defn["settings"]}


def test_hub_file_is_the_generated_one(about):
    expected = gen.render(gen.definition(about))
    assert HUB_FILE.read_text(encoding="utf-8") == expected, (
        "hub/target-orb.yml disagrees with `target-orb --about`: run `python hub/generate.py`"
    )


def test_check_mode_fails_on_a_stale_file(tmp_path, monkeypatch, capsys):
    stale = tmp_path / "target-orb.yml"
    hub = _hub()
    hub["settings"] = [s for s in hub["settings"] if s["name"] != "api_key"]
    stale.write_text(gen.render(hub), encoding="utf-8")
    monkeypatch.setattr(gen, "HUB_FILE", stale)
    assert gen.main(["--check"]) == 1
    err = capsys.readouterr().err
    assert "+- description: 'Orb API key" in err
    assert "run `python hub/generate.py`" in err
    assert gen.main([]) == 0  # rewrites it
    assert gen.main(["--check"]) == 0


def test_every_setting_of_about_is_defined(about):
    props = about["settings"]["properties"]
    names = set(_settings(_hub()))
    for name, prop in props.items():
        if name == "faker_config":  # listed by its keys, as the Hub does
            assert {f"faker_config.{k}" for k in prop["properties"]} <= names
        else:
            assert name in names, name
    assert names - set(props) == {"faker_config.seed", "faker_config.locale"}


def test_kinds_that_meltano_config_set_stores_as_json():
    settings = _settings(_hub())
    for name in ("properties_mapping", "traits_mapping", "stream_maps", "stream_map_config"):
        assert settings[name]["kind"] == "object", name
    for name in ("event_types", "event_allowlist", "event_denylist", "identify_streams"):
        assert settings[name]["kind"] == "array", name
    assert settings["flush_interval_seconds"]["kind"] == "decimal"
    assert settings["batch_size_rows"] == {
        "name": "batch_size_rows", "label": "Batch size", "kind": "integer", "value": 500,
        "description": "Events per request to Orb, at most 500.",
    }
    assert settings["late_event_policy"]["options"] == [
        {"label": "Reject", "value": "reject"},
        {"label": "Send", "value": "send"},
        {"label": "Backfill", "value": "backfill"},
    ]


def test_secrets_are_sensitive_and_have_no_default(about):
    settings = _settings(_hub())
    secret = {n for n, p in about["settings"]["properties"].items() if p.get("secret")}
    assert "api_key" in secret
    assert {n for n, s in settings.items() if s.get("sensitive")} == secret
    for name in secret:
        assert "value" not in settings[name], name


def test_preset_dependent_fields_have_no_value():
    # Meltano passes a `value` explicitly, which would override record_preset's defaults.
    settings = _settings(_hub())
    for name in ("event_name_field", "external_customer_id_field", "idempotency_key_field",
                 "timestamp_field", "properties_field", "properties_passthrough", "traits_field"):
        assert "value" not in settings[name], name


def test_plugin_fields_match_the_package():
    hub = _hub()
    dist = importlib.metadata.distribution("target-orb")
    scripts = {ep.name: ep.value for ep in dist.entry_points if ep.group == "console_scripts"}
    assert hub["name"] == "target-orb"
    assert hub["namespace"] == "target_orb"
    assert hub["pip_url"] == dist.metadata["Name"]
    assert scripts[hub["executable"]] == "target_orb.target:TargetOrb.cli"
    assert hub["settings_group_validation"] == [["api_key"]]
    for key in ("variant", "label", "description", "repo", "docs", "keywords"):
        assert hub.get(key), key


def test_meltano_accepts_it_as_a_loader():
    """What `meltano add --from-ref` writes into meltano.yml passes Meltano's own schema."""
    schema = json.loads(MELTANO_SCHEMA.read_text(encoding="utf-8"))
    plugin = {k: v for k, v in _hub().items() if k not in HUB_ONLY}
    validator = jsonschema.Draft202012Validator(
        {"$schema": schema["$schema"], "$defs": schema["$defs"], "$ref": "#/$defs/plugins/loaders"}
    )
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(plugin)]
    assert errors == []
    # and the check bites: a capability Meltano does not know for loaders
    bad = {**plugin, "capabilities": [*plugin["capabilities"], "validate-records"]}
    assert list(validator.iter_errors(bad))


def test_agrees_with_the_repositorys_meltano_yml():
    """The demo project's inline loader and the Hub definition describe settings alike."""
    project = yaml.safe_load((REPO / "meltano.yml").read_text(encoding="utf-8"))
    (loader,) = [p for p in project["plugins"]["loaders"] if p["name"] == "target-orb"]
    hub = _settings(_hub())
    assert loader["namespace"] == _hub()["namespace"]
    assert loader["executable"] == _hub()["executable"]
    for setting in loader["settings"]:
        name = setting["name"]
        assert name in hub, name
        for key in ("kind", "value", "sensitive"):
            assert setting.get(key) == hub[name].get(key), (name, key)
        assert [o["value"] for o in setting.get("options", [])] == [
            o["value"] for o in hub[name].get("options", [])
        ], name
