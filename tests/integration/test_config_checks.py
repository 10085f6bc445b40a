"""A newcomer's config mistakes (issue 19): each fails at start with one clear message.

Every test runs the installed `target-orb` against the loopback stand-in: a mistyped setting,
an object-valued setting given as JSON text (as `meltano config set` stores it), a wrong
shape, a mistyped `TARGET_ORB_*` variable under `--config ENV`.
"""

from __future__ import annotations

import json
import subprocess

from tests.conftest import (
    API_KEY,
    TARGET_ORB,
    assert_no_secret,
    base_config,
    run_target,
    singer_lines,
    track,
)


def _errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "| ERROR" in line]


def test_a_mistyped_setting_fails_at_start_naming_the_closest_setting(orb, tmp_path):
    config = base_config(orb, tmp_path)
    config["properties_maping"] = config.pop("properties_mapping")  # one `p`
    result = run_target(config, singer_lines([track(1)]), tmp_path)
    assert result.returncode == 1
    assert (
        "`properties_maping` is not a setting of target-orb; did you mean "
        "`properties_mapping`?" in result.stderr
    )
    assert "Traceback" not in result.stderr
    assert result.stdout == ""  # no STATE
    assert orb.requests == []  # before any request, the ping included
    assert result.dead_letters == []
    assert_no_secret(result.stderr)


def test_every_unknown_key_is_named_in_one_error_and_underscore_keys_are_comments(orb, tmp_path):
    config = base_config(
        orb, tmp_path, batch_size_row=100, grace_period_hour=12, zzz_nothing_like_it=1,
        _comment="keys starting with _ are ignored",
    )
    result = run_target(config, singer_lines([track(1)]), tmp_path)
    assert result.returncode == 1
    (unknown,) = [line for line in _errors(result.stderr) if "is not a setting" in line]
    assert "`batch_size_row` is not a setting of target-orb; did you mean `batch_size_rows`?" in (
        unknown
    )
    assert "`grace_period_hour` is not a setting of target-orb; did you mean " \
        "`grace_period_hours`?" in unknown
    assert "`zzz_nothing_like_it` is not a setting of target-orb" in unknown
    assert "_comment" not in result.stderr
    assert orb.requests == []


def test_underscore_keys_alone_do_not_fail_the_run(orb, tmp_path):
    config = base_config(orb, tmp_path, _comment="billing feed for acme")
    result = run_target(config, singer_lines([track(1)]), tmp_path)
    assert result.returncode == 0, result.stderr
    assert [e["idempotency_key"] for e in orb.events()] == ["m1"]


def test_sdk_builtin_settings_are_known(orb, tmp_path):
    config = base_config(orb, tmp_path, add_record_metadata=False, stream_maps={},
                         stream_map_config={}, validate_records=False)
    result = run_target(config, singer_lines([track(1)]), tmp_path)
    assert result.returncode == 0, result.stderr


def test_config_validation_failed_is_printed_once(orb, tmp_path):
    config = base_config(orb, tmp_path, batch_size_rows=900)
    result = run_target(config, singer_lines([track(1)]), tmp_path)
    assert result.returncode == 1
    assert result.stderr.count("Config validation failed") == 1, result.stderr
    assert "WARNING" not in "".join(
        line for line in result.stderr.splitlines() if "Config validation failed" in line
    )
    assert "batch_size_rows" in result.stderr


def test_an_object_setting_given_as_json_text_is_parsed(orb, tmp_path):
    # `meltano config set target-orb properties_mapping '{"tokens": "tokens"}'` on a setting
    # Meltano does not know the kind of stores the text; target-orb reads it as the object.
    config = base_config(orb, tmp_path, properties_mapping='{"tokens": "tokens"}',
                         event_types='["track"]')
    result = run_target(config, singer_lines([track(1)]), tmp_path)
    assert result.returncode == 0, result.stderr
    assert orb.events()[0]["properties"] == {"tokens": 1}


def test_a_wrong_shape_names_the_expected_shape_and_an_example(orb, tmp_path):
    config = base_config(orb, tmp_path, properties_mapping=["tokens"],
                         event_types="track, page")
    result = run_target(config, singer_lines([track(1)]), tmp_path)
    assert result.returncode == 1
    errors = "\n".join(_errors(result.stderr))
    assert "`properties_mapping` must be an object" in errors
    assert 'e.g. {"amount": "amount"' in errors
    assert "`event_types` is text that is not JSON" in errors
    assert 'must be an array of strings, e.g. ["track"]' in errors
    # reported once each, in target-orb's words (not the schema's "is not of type")
    assert "is not of type" not in errors
    assert "Traceback" not in result.stderr
    assert orb.requests == []


def test_json_text_that_is_not_json_fails_with_the_shape(orb, tmp_path):
    config = base_config(orb, tmp_path, properties_mapping="{tokens: tokens}")
    result = run_target(config, singer_lines([track(1)]), tmp_path)
    assert result.returncode == 1
    assert "`properties_mapping` is text that is not JSON" in result.stderr
    assert "must be an object" in result.stderr
    assert "Traceback" not in result.stderr


def _run_env(env: dict[str, str], tmp_path, lines: list[str]) -> subprocess.CompletedProcess:
    base = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    return subprocess.run(
        [TARGET_ORB, "--config", "ENV"], input="\n".join(lines) + "\n", text=True,
        capture_output=True, env={**base, **env}, timeout=60, check=False, cwd=tmp_path,
    )


def _env(orb, tmp_path) -> dict[str, str]:
    return {
        "TARGET_ORB_API_KEY": API_KEY,
        "TARGET_ORB_API_URL": orb.url,
        "TARGET_ORB_EXTERNAL_CUSTOMER_ID_FIELD": "userId",
        "TARGET_ORB_DEAD_LETTER_PATH": str(tmp_path / "dl.jsonl"),
        "TARGET_ORB_PROGRESS_INTERVAL_SECONDS": "0",
    }


def test_a_mistyped_environment_variable_is_warned_about_with_the_closest(orb, tmp_path):
    env = _env(orb, tmp_path) | {"TARGET_ORB_PROPERTIES_MAPING": '{"tokens": "tokens"}'}
    proc = _run_env(env, tmp_path, singer_lines([track(1)]))
    assert proc.returncode == 0, proc.stderr  # a warning, not an error
    (warning,) = [
        line for line in proc.stderr.splitlines() if "TARGET_ORB_PROPERTIES_MAPING" in line
    ]
    assert "WARNING" in warning
    assert "did you mean TARGET_ORB_PROPERTIES_MAPPING" in warning
    assert orb.events()[0]["properties"] == {}  # the mistyped mapping was not used
    assert "LOGLEVEL" not in proc.stderr
    assert_no_secret(proc.stderr)


def test_a_loglevel_variable_is_not_a_mistyped_setting(orb, tmp_path):
    env = _env(orb, tmp_path) | {"TARGET_ORB_LOGLEVEL": "INFO"}
    proc = _run_env(env, tmp_path, singer_lines([track(1)]))
    assert proc.returncode == 0, proc.stderr
    assert "is not a setting" not in proc.stderr


def test_bad_json_in_an_environment_variable_fails_clearly(orb, tmp_path):
    env = _env(orb, tmp_path) | {"TARGET_ORB_PROPERTIES_MAPPING": "{bad"}
    proc = _run_env(env, tmp_path, singer_lines([track(1)]))
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert "`properties_mapping` is text that is not JSON" in proc.stderr
    assert proc.stdout == ""
    assert orb.requests == []


def test_json_in_environment_variables_still_works(orb, tmp_path):
    env = _env(orb, tmp_path) | {
        "TARGET_ORB_PROPERTIES_MAPPING": json.dumps({"tokens": "tokens"}),
        "TARGET_ORB_EVENT_TYPES": '["track", "page"]',
    }
    proc = _run_env(env, tmp_path, singer_lines([track(1)]))
    assert proc.returncode == 0, proc.stderr
    assert orb.events()[0]["properties"] == {"tokens": 1}


def test_a_secret_of_the_wrong_type_is_reported_without_its_value(orb, tmp_path):
    config = base_config(orb, tmp_path, api_key=987654321012345)
    result = run_target(config, singer_lines([track(1)]), tmp_path)
    assert result.returncode == 1
    assert "987654321012345" not in result.stderr
    assert "`api_key`" in result.stderr
    assert "Traceback" not in result.stderr
