"""The README's settings table is the `--about --format=markdown` output (no drift)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from target_orb.target import TargetOrb

README = Path(__file__).resolve().parents[2] / "README.md"


# The SDK renders the `load_method` enum default differently across Python versions.
_ENUM_DEFAULT = ("TargetLoadMethods.APPEND_ONLY", "append-only")


def _about_table(capsys) -> str:
    TargetOrb.print_about("markdown")
    text = capsys.readouterr().out
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| Setting"))
    end = start
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    return "\n".join(lines[start:end]).replace(*_ENUM_DEFAULT)


def test_readme_settings_table_matches_about(capsys):
    readme = README.read_text()
    match = re.search(
        r"<!-- settings-table:start -->\n(.*?)\n<!-- settings-table:end -->", readme, re.S
    )
    assert match, "README lacks the settings-table markers"
    table = _about_table(capsys).strip()
    if os.environ.get("UPDATE_README") == "1":  # UPDATE_README=1 pytest tests/unit/test_readme.py
        README.write_text(readme.replace(match.group(1), table))
        return
    assert match.group(1).strip().replace(*_ENUM_DEFAULT) == table


def test_every_contract_setting_is_in_the_schema():
    names = set(TargetOrb.config_jsonschema["properties"])
    contract = {
        "api_key", "event_name_field", "external_customer_id_field", "idempotency_key_field",
        "properties_mapping", "api_url", "customer_id_field", "timestamp_field",
        "properties_field", "properties_passthrough", "record_preset", "event_types",
        "honor_integrations", "integration_name", "event_allowlist", "event_denylist",
        "nested_properties", "invalid_event_policy", "dead_letter_path", "dry_run",
        "batch_size_rows", "max_concurrent_requests", "request_timeout", "max_retry_seconds",
        "late_event_policy", "grace_period_hours", "future_tolerance_seconds",
        "max_requests_per_second", "max_events_per_minute", "progress_interval_seconds",
        "identify_policy", "traits_field", "traits_mapping", "traits_passthrough",
        "identify_streams",
    }
    assert contract <= names
    schema = TargetOrb.config_jsonschema["properties"]
    assert schema["api_key"].get("secret") is True
    for name in contract:
        assert schema[name].get("title") and schema[name].get("description"), name
    for name in ("batch_size_rows", "max_concurrent_requests", "request_timeout",
                 "max_retry_seconds", "grace_period_hours", "future_tolerance_seconds",
                 "max_requests_per_second", "max_events_per_minute",
                 "progress_interval_seconds"):
        assert "integer" in schema[name]["type"], name
