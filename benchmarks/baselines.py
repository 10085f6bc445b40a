"""Baseline targets the benchmark compares target-orb with. Both use singer-sdk defaults.

- ``noop``: ``NoopTarget``, a singer-sdk ``Target`` whose ``BatchSink.process_batch`` does
  nothing. Default message reader (stdlib json), record validation on (jsonschema),
  timestamp parsing on, ``batch_size_rows`` default (10,000). This is the cost of the
  SDK's read → validate → batch path alone.
- ``sync-http``: ``SyncHttpTarget``, the straightforward HTTP target: SDK defaults for
  reading and validation, ``BatchSink`` with ``MAX_SIZE_DEFAULT = 500``, and a
  ``process_batch`` that maps each record minimally into an Orb event and POSTs the
  batch of 500 with ``requests`` (one ``Session``), waiting for each answer before
  reading on. One request in flight at a time.

Run either as a CLI (``NoopTarget.cli()`` / ``SyncHttpTarget.cli()``)::

    .venv/bin/python benchmarks/baselines.py noop --input FILE
    .venv/bin/python benchmarks/baselines.py sync-http --config CONFIG.json --input FILE

``sync-http`` needs ``api_url`` and ``api_key`` in its config.
"""

from __future__ import annotations

import datetime
import decimal
import json
import sys
import typing as t

import requests
from singer_sdk import Target
from singer_sdk import typing as th
from singer_sdk.sinks import BatchSink

_UTC = datetime.timezone.utc


class NoopSink(BatchSink):
    """Collects records in the default way and drops each batch."""

    def process_batch(self, context: dict) -> None:
        """Do nothing.

        Args:
            context: The batch (ignored).
        """


class NoopTarget(Target):
    """No-op singer-sdk target at SDK defaults."""

    name = "target-noop"
    config_jsonschema = th.PropertiesList().to_dict()
    default_sink_class = NoopSink


def _orb_timestamp(value: t.Any) -> str:
    if isinstance(value, datetime.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=_UTC)
        return value.astimezone(_UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return str(value)


def _scalar(value: t.Any) -> t.Any:
    if isinstance(value, decimal.Decimal):
        return float(value)
    if isinstance(value, (str, bool, int, float)):
        return value
    return None


def to_orb_event(record: dict[str, t.Any]) -> dict[str, t.Any]:
    """Minimal Segment Track → Orb event mapping (flat scalar properties only)."""
    props = record.get("properties") or {}
    flat = {}
    for key, value in props.items():
        scalar = _scalar(value)
        if scalar is not None:
            flat[key] = scalar
    return {
        "idempotency_key": record["messageId"],
        "event_name": record["event"],
        "external_customer_id": record["userId"],
        "timestamp": _orb_timestamp(record["timestamp"]),
        "properties": flat,
    }


class SyncHttpSink(BatchSink):
    """One POST of at most 500 events per batch, answered before the next record is read."""

    MAX_SIZE_DEFAULT = 500

    def __init__(self, *args: t.Any, **kwargs: t.Any) -> None:
        """Open one requests.Session for the sink.

        Args:
            args: Passed to the SDK.
            kwargs: Passed to the SDK.
        """
        super().__init__(*args, **kwargs)
        self._session = requests.Session()
        self._session.trust_env = False
        self._session.headers.update({
            "Authorization": f"Bearer {self.config['api_key']}",
            "Content-Type": "application/json",
        })
        self._url = self.config["api_url"].rstrip("/") + "/ingest"

    def process_batch(self, context: dict) -> None:
        """POST the batch and fail on anything but a 2xx.

        Args:
            context: The batch; ``context["records"]`` holds the records.

        Raises:
            RuntimeError: On a non-2xx answer.
        """
        records = context.get("records", [])
        if not records:
            return
        body = json.dumps({"events": [to_orb_event(r) for r in records]})
        response = self._session.post(self._url, data=body, timeout=(10, 60))
        if not 200 <= response.status_code < 300:
            raise RuntimeError(f"ingest answered {response.status_code}: {response.text[:300]}")


class SyncHttpTarget(Target):
    """Synchronous one-request-at-a-time HTTP target at SDK defaults."""

    name = "target-sync-http"
    config_jsonschema = th.PropertiesList(
        th.Property("api_url", th.StringType, required=True),
        th.Property("api_key", th.StringType, required=True, secret=True),
    ).to_dict()
    default_sink_class = SyncHttpSink


TARGETS = {"noop": NoopTarget, "sync-http": SyncHttpTarget}


def main() -> None:
    """``baselines.py {noop|sync-http} [SDK CLI options]``."""
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.stderr.write(f"usage: baselines.py {{{'|'.join(TARGETS)}}} [--config F] --input F\n")
        sys.exit(2)
    target = TARGETS[sys.argv.pop(1)]
    target.cli()


if __name__ == "__main__":
    main()
