"""OrbSink: maps each record once in process_record and hands batches to the delivery pipeline."""

from __future__ import annotations

import datetime
import time
import typing as t

import fastjsonschema
from singer_sdk.exceptions import InvalidRecord
from singer_sdk.sinks.core import BaseJSONSchemaValidator
from typing_extensions import override

from target_orb.mapping.fields import Invalid
from target_orb.mapping.track import Mapped, Skip, dedupe_request, map_record
from target_orb.mapping.traits import Skipped, Update, is_identify, is_identify_stream, map_identify
from target_orb.pipeline.deadletter import entry
from target_orb.settings import MAX_EVENTS_PER_REQUEST
from target_orb.singer.sdk_seam import SeamSink

if t.TYPE_CHECKING:
    from singer_sdk import Target

    from target_orb.runtime import RuntimeHost

_UTC = datetime.timezone.utc
_MAX_SCHEMA_WARNINGS = 5
# The time windows are checked against a clock read at most this often (not per record).
_NOW_REFRESH_SECONDS = 0.5


class FastJSONSchemaValidator(BaseJSONSchemaValidator):
    """Record validation through fastjsonschema (~4x the SDK's jsonschema path).

    Formats are not checked (as in the SDK default); target-orb's own mapping checks
    the fields it uses.
    """

    def __init__(self, schema: dict[str, t.Any]) -> None:
        """Compile the stream schema.

        Args:
            schema: The stream's JSON schema.
        """
        super().__init__(schema)
        self._validate = fastjsonschema.compile(schema, formats={}, use_default=False)

    @override
    def validate(self, record: dict[str, t.Any]) -> None:
        try:
            self._validate(record)
        except fastjsonschema.JsonSchemaValueException as exc:
            raise InvalidRecord(exc.message, record) from None


class OrbSink(SeamSink):
    """One sink per stream; all sinks share the target's pipeline, stats and dead letters."""

    MAX_SIZE_DEFAULT = MAX_EVENTS_PER_REQUEST  # Orb /v1/ingest takes at most 500 events

    def __init__(
        self,
        target: Target,
        stream_name: str,
        schema: dict,
        key_properties: t.Sequence[str] | None,
    ) -> None:
        """Keep a reference to the target's shared runtime (the SDK 0.54 sink keeps none).

        Args:
            target: The target (a `RuntimeHost`: `TargetOrb`).
            stream_name: Stream name.
            schema: Stream schema.
            key_properties: Key properties.
        """
        self._runtime = t.cast("RuntimeHost", target).runtime
        self._schema_warnings = 0
        self._now = datetime.datetime.now(_UTC)
        self._now_at = time.monotonic()
        identify = self._runtime.identify
        self._identify_stream = identify is not None and is_identify_stream(stream_name, identify)
        super().__init__(target, stream_name, schema, key_properties)
        self._seam_max_size = self.max_size  # config-only; read once, not per record

    @property
    @override
    def max_size(self) -> int:
        return min(super().max_size, MAX_EVENTS_PER_REQUEST)

    @override
    def get_validator(self) -> BaseJSONSchemaValidator | None:
        if not self.validate_schema:
            return None
        try:
            return FastJSONSchemaValidator(self.schema)
        except (fastjsonschema.JsonSchemaDefinitionException, ValueError, TypeError):
            # fastjsonschema cannot compile every schema a tap may send; fall back.
            return super().get_validator()

    @override
    def check_record(self, validator: BaseJSONSchemaValidator, record: dict) -> None:
        """Validate without crashing on schema drift (the SDK never parses timestamps here).

        A record that does not match the tap's schema is still offered to the mapping,
        which dead-letters it if it cannot become a valid event (schema drift such as an
        integer column holding "N/A" must not abort a billing run). Timestamps are
        parsed by target-orb's own timestamp code, so the SDK's parsing (which raises on
        an unparseable value and rewrites the dead-letter record) is skipped
        (target_orb/singer/sdk_seam.py, item 6).

        Args:
            validator: The stream's validator.
            record: The record.
        """
        try:
            validator.validate(record)
        except InvalidRecord as exc:
            self._schema_warnings += 1
            if self._schema_warnings <= _MAX_SCHEMA_WARNINGS:
                self.logger.warning(
                    "Record does not match the stream schema (%s); mapping it anyway.",
                    exc.args[0] if exc.args else exc,
                )

    @override
    def process_record(self, record: dict, context: dict) -> None:
        runtime = self._runtime
        runtime.stats.records_read += 1
        if time.monotonic() - self._now_at > _NOW_REFRESH_SECONDS:
            self._now = datetime.datetime.now(_UTC)
            self._now_at = time.monotonic()
        if runtime.identify is not None and is_identify(record, self._identify_stream):
            self._process_identify(record, context)
            return
        if runtime.corrections is not None:  # load_method: upsert
            runtime.corrections.add_record(
                self.stream_name, record, context, self._now, runtime.stats,
            )
            return
        result = map_record(record, self.stream_name, runtime.spec, self._now)
        if type(result) is Mapped:
            if result.key_derived:
                runtime.note_derived_key(self.stream_name)
            events = context.setdefault("events", [])
            if result.late:  # late_event_policy: backfill
                context.setdefault("late", set()).add(len(events))
            events.append(result.event)
            context.setdefault("records", []).append(record)
        elif type(result) is Skip:
            runtime.stats.skipped[result.reason] += 1
        else:
            assert isinstance(result, Invalid)
            runtime.stats.invalid[result.code] += 1
            context.setdefault("invalid", []).append(
                entry(self.stream_name, record, result.reason, "local"),
            )

    def _process_identify(self, record: dict, context: dict) -> None:
        """An Identify under `identify_policy: customer_metadata`: a metadata update."""
        runtime = self._runtime
        runtime.stats.identifies_read += 1
        assert runtime.identify is not None
        result = map_identify(record, runtime.identify)
        if type(result) is Update:
            context.setdefault("identifies", []).append((result, record))
        elif type(result) is Skipped:
            runtime.stats.identifies_skipped[result.reason] += 1
        else:
            assert isinstance(result, Invalid)
            runtime.stats.invalid[result.code] += 1
            context.setdefault("invalid", []).append(
                entry(self.stream_name, record, result.reason, "local"),
            )

    @override
    def reject_record(self, record: dict, context: dict, code: str, reason: str) -> None:
        """Take a record the reader could not read as it is (NaN, bad text) as invalid.

        It joins the current batch's dead-letter lines, so STATE moves past it only once it
        is durably dead-lettered, like any other invalid record.

        Args:
            record: A JSON-safe copy of the record (poison values escaped as text).
            context: The current batch.
            code: The invalid-by-reason counter.
            reason: The dead-letter reason.
        """
        runtime = self._runtime
        runtime.stats.records_read += 1
        runtime.stats.invalid[code] += 1
        context.setdefault("invalid", []).append(entry(self.stream_name, record, reason, "local"))

    @override
    def process_batch(self, context: dict) -> None:
        """Dead-letter local rejects (fsynced), then queue the request for Orb.

        STATE is held by the pipeline until the request is settled, so returning before
        Orb answered never moves a bookmark past undelivered events. Under
        `late_event_policy: backfill`, late events go to the backfill manager (never into a
        live request) and live ones to ingest, each as a job behind the same STATE gate.
        """
        runtime = self._runtime
        if runtime.corrections is not None:  # load_method: upsert
            runtime.corrections.submit_batch(self.stream_name, context)
            if context.get("identifies"):
                runtime.customers.submit(self.stream_name, context["identifies"])
            return
        events: list[dict] = context.get("events", [])
        records: list[t.Any] = context.get("records", [])
        invalid = context.get("invalid", [])
        kept: t.Sequence[int] = range(len(events))  # original index of each event sent
        if events:
            keep, collapsed, conflicts = dedupe_request(events)
            if collapsed or conflicts:
                runtime.stats.duplicates_collapsed += collapsed
                for index, reason in conflicts:
                    runtime.stats.invalid["duplicate_key_conflict"] += 1
                    invalid.append(
                        entry(self.stream_name, records[index], reason, "local", events[index]),
                    )
                events = [events[i] for i in keep]
                records = [records[i] for i in keep]
                kept = keep
        runtime.pipeline.reject_local(self.stream_name, invalid)
        identifies = context.get("identifies")
        if identifies:
            runtime.customers.submit(self.stream_name, identifies)
        if runtime.backfills is None:
            runtime.pipeline.submit(self.stream_name, events, records)
            return
        # late_event_policy: backfill. Duplicates were collapsed over live and late events
        # together, so one key never goes both live and into a backfill from one batch.
        late_marks: set[int] = context.get("late") or set()
        live_events, live_records, late_events, late_records = [], [], [], []
        for position, index in enumerate(kept):
            if index in late_marks:
                late_events.append(events[position])
                late_records.append(records[position])
            else:
                live_events.append(events[position])
                live_records.append(records[position])
        self._submit_backfill_policy(live_events, live_records, late_events, late_records)

    def _submit_backfill_policy(
        self,
        events: list[dict],
        records: list[t.Any],
        late_events: list[dict],
        late_records: list[t.Any],
    ) -> None:
        runtime = self._runtime
        backfills = runtime.backfills
        assert backfills is not None
        pipeline = runtime.pipeline
        stream = self.stream_name
        if late_events:
            runtime.stats.late_events += len(late_events)
            if backfills.dry_run:
                backfills.plan(late_events)
                self.logger.info(
                    "DRY RUN: %d late events would be loaded through backfills (see the plan "
                    "at the end); nothing is sent.", len(late_events),
                )
            else:
                pipeline.submit_job(
                    stream, backfills.load_job(stream, late_events, late_records),
                    len(late_events),
                )
        if not events:
            return
        if backfills.dry_run:
            pipeline.submit(stream, events, records)
            return
        pipeline.submit_job(stream, backfills.live_job(stream, events, records), len(events))
