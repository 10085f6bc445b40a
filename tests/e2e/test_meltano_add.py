"""A new Meltano project adds target-orb from hub/target-orb.yml and runs it (issue 18).

What a data engineer does on a fresh machine, in a temp dir: `meltano init`, then
`meltano add target-orb --from-ref <definition>` (the definition's `pip_url` pointed at this
checkout, as a user of a clone would, since target-orb is not on PyPI yet), the demo tap
(`tap-segment`: the PyPI tap `tap-jsonl`, defined as in this repository's meltano.yml) added
the same way, settings stored with `meltano config set` (object and array settings must be
stored as JSON values, not strings), `meltano install`, and `meltano run tap-segment
target-orb` into the in-process stand-in Orb on 127.0.0.1. Every Meltano call is bounded
(tests/e2e/meltano_harness.py kills the process group on timeout).

Without Meltano next to the interpreter this test skips locally and FAILS in CI (`CI` set).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import time
import typing as t
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from fake_orb import FakeOrb
from tests.e2e.conftest import TIMINGS
from tests.e2e.meltano_harness import CLI_TIMEOUT, INSTALL_TIMEOUT, MeltanoProject, find_meltano
from tests.e2e.test_meltano_run import EXPECTED, GRACE_PERIOD_HOURS, NO_USER_ID, SAMPLE, STREAM

REPO = Path(__file__).resolve().parents[2]
HUB_FILE = REPO / "hub" / "target-orb.yml"
RUN_TIMEOUT = 180
STATE_ID = "dev:tap-segment-to-target-orb"

# The demo's target settings (this repository's meltano.yml), set one by one with
# `meltano config set` as a user would: name -> value as typed on the command line.
TARGET_CONFIG = {
    "external_customer_id_field": "userId",
    "properties_mapping": json.dumps({k: k for k in (
        "amount", "currency", "confirmation_time", "tokens", "endpoint", "region", "pages",
        "seats", "bytes")}),
    "event_denylist": json.dumps(["Audience Entered", "Audience Exited", "Trait Computed"]),
    "grace_period_hours": str(GRACE_PERIOD_HOURS),
}


@dataclass
class Added:
    project: MeltanoProject
    definition: dict[str, t.Any]
    meltano_yml: dict[str, t.Any]
    add_output: str


def _meltano() -> str:
    meltano = find_meltano()
    if meltano is None:
        reason = (
            "meltano is not installed (next to the interpreter or on PATH): "
            "pip install -e '.[test]'"
        )
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the Meltano end-to-end tests: {reason}", pytrace=False)
        pytest.skip(reason)
    return meltano


def _tap_definition() -> dict[str, t.Any]:
    """The repository's inline `tap-segment` (tap-jsonl), as a definition file (no config)."""
    project = yaml.safe_load((REPO / "meltano.yml").read_text(encoding="utf-8"))
    (tap,) = [p for p in project["plugins"]["extractors"] if p["name"] == "tap-segment"]
    return {k: v for k, v in tap.items() if k != "config"}


@pytest.fixture(scope="module")
def added(tmp_path_factory: pytest.TempPathFactory) -> Added:
    meltano = _meltano()
    work = tmp_path_factory.mktemp("meltano-add")
    started = time.monotonic()
    MeltanoProject(root=work, meltano=meltano).run(
        "init", "orb-project", "--no_usage_stats", timeout=CLI_TIMEOUT
    ).check()
    project = MeltanoProject(root=work / "orb-project", meltano=meltano)

    # The user's copy of the definition, pip_url pointed at this checkout.
    definition = yaml.safe_load(HUB_FILE.read_text(encoding="utf-8"))
    assert definition["pip_url"] == "target-orb"
    definition["pip_url"] = f"-e {shlex.quote(str(REPO))}"
    target_ref = work / "target-orb.yml"
    target_ref.write_text(yaml.safe_dump(definition, sort_keys=False), encoding="utf-8")
    tap_ref = work / "tap-segment.yml"
    tap_ref.write_text(yaml.safe_dump(_tap_definition(), sort_keys=False), encoding="utf-8")

    # Meltano 4 infers the type from the name's prefix (`meltano add loader target-orb ...`
    # would add a second plugin, a utility).
    add = project.run("add", "target-orb", "--from-ref", str(target_ref), "--no-install",
                      timeout=CLI_TIMEOUT).check()
    project.run("add", "tap-segment", "--from-ref", str(tap_ref), "--no-install",
                timeout=CLI_TIMEOUT).check()

    (project.root / "demo").mkdir()
    shutil.copyfile(SAMPLE, project.root / "demo" / SAMPLE.name)
    for name, value in {
        "path": "$MELTANO_PROJECT_ROOT/demo/" + SAMPLE.name,
        "stream_name": STREAM,
        "primary_keys": '["messageId"]',
    }.items():
        project.run("config", "set", "tap-segment", name, value, timeout=CLI_TIMEOUT).check()
    for name, value in {**TARGET_CONFIG, "dead_letter_path": "output/dead-letter.jsonl"}.items():
        project.run("config", "set", "target-orb", name, value, timeout=CLI_TIMEOUT).check()
    TIMINGS["meltano init + add --from-ref + config set"] = time.monotonic() - started

    started = time.monotonic()
    project.run("install", timeout=INSTALL_TIMEOUT).check()
    TIMINGS["meltano install (tap-jsonl + target-orb from the definition)"] = (
        time.monotonic() - started
    )
    meltano_yml = yaml.safe_load((project.root / "meltano.yml").read_text(encoding="utf-8"))
    return Added(project, definition, meltano_yml, add.stdout + add.stderr)


@pytest.fixture(scope="module")
def run(added: Added) -> tuple[t.Any, FakeOrb]:
    orb = FakeOrb(grace_period_hours=GRACE_PERIOD_HOURS).start()
    try:
        started = time.monotonic()
        env = {"TARGET_ORB_API_URL": orb.url, "TARGET_ORB_API_KEY": orb.api_key}
        result = added.project.run("run", "tap-segment", "target-orb", timeout=RUN_TIMEOUT,
                                   env=env).check()
        TIMINGS["meltano run tap-segment target-orb (added from the definition)"] = (
            time.monotonic() - started
        )
    finally:
        orb.stop()
    return result, orb


def test_the_definition_becomes_the_projects_loader(added: Added):
    plugins = added.meltano_yml["plugins"]
    assert set(plugins) == {"loaders", "extractors"}  # no stray utility
    (loader,) = plugins["loaders"]
    for key in ("name", "namespace", "executable", "pip_url", "variant", "capabilities",
                "settings_group_validation"):
        assert loader[key] == added.definition[key], key
    assert [s["name"] for s in loader["settings"]] == [
        s["name"] for s in added.definition["settings"]
    ]
    assert "To learn more about loader 'target-orb'" in added.add_output


def test_config_set_stores_typed_values(added: Added):
    """What target-orb will be handed: JSON values for the object and array settings."""
    res = added.project.run("config", "print", "target-orb", timeout=CLI_TIMEOUT).check()
    config = json.loads(res.stdout)
    assert config["properties_mapping"] == json.loads(TARGET_CONFIG["properties_mapping"])
    assert config["event_denylist"] == json.loads(TARGET_CONFIG["event_denylist"])
    assert config["grace_period_hours"] == GRACE_PERIOD_HOURS
    assert config["event_types"] == ["track"]  # the definition's default, typed
    # No value for the preset-dependent fields, none for the key (it comes from the env).
    for name in ("api_key", "event_name_field", "idempotency_key_field", "timestamp_field"):
        assert name not in config, name


def test_run_lands_the_sendable_tracks(run):
    result, orb = run
    events = orb.events()
    assert sorted(e["idempotency_key"] for e in events) == sorted(EXPECTED)
    for ev in events:
        name, customer, _when, props = EXPECTED[ev["idempotency_key"]]
        assert (ev["event_name"], ev["external_customer_id"], ev["properties"]) == (
            name, customer, props)
    assert all(r["status"] == 200 for r in orb.ingest_requests())
    assert orb.api_key not in result.stdout + result.stderr


def test_run_dead_letters_and_stores_state(added: Added, run):
    path = added.project.root / "output" / "dead-letter.jsonl"
    (entry,) = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert entry["record"]["messageId"] == NO_USER_ID
    res = added.project.run("state", "get", STATE_ID, timeout=CLI_TIMEOUT).check()
    (line,) = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    assert STREAM in json.loads(line)["singer_state"]["bookmarks"]
