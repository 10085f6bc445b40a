"""The one place target-orb uses singer-sdk private names (written against singer-sdk 0.54.x).

Everything else in target_orb uses the SDK's public API only; tests/unit/test_sdk_seam.py
fails when another module uses a private SDK name, and pins a sha256 of the source of every
SDK function copied or replaced here, so a singer-sdk upgrade that changes one of them fails
a named test until someone has read the change and ported it.

What is used, why, and the public API that would replace it:

1. `SeamTarget._MAX_RECORD_AGE_IN_MINUTES` (SDK default 5). The SDK drains every sink (and
   so offers STATE) this often while records arrive; one minute keeps the bookmark close
   to what Orb acknowledged on slow streams. Would become: a public class attribute or a
   constructor argument (the SDK already reads it only through `_handle_max_record_age`).
2. `SeamTarget._validate_config`: appends the cross-field problems (`config_problems`) to
   the SDK's schema errors so the user gets one `ConfigValidationError` listing every
   problem. Would become: a public `validate_config()` hook returning extra errors.
3. `SeamTarget._write_state_message`: `drain_all` (final) calls it right after
   `process_batch` returned; target-orb's `process_batch` only queues work, so STATE is
   routed to the pipeline's gate (`offer_state`), which writes it once Orb acknowledged
   everything before it (Decimal-safe too, unlike the SDK's `json.dumps`, sdk#3787).
   Would become: a public `write_state_message()`/`emit_state()` hook.
4. `SeamTarget._process_schema_message` (abstract in the SDK's reader base): extended, not
   copied: it calls `before_schema` first (the ping), then the SDK's, then decides whether
   the stream can take the fast record path below. Would become: a public
   `on_schema_message()` hook.
5. `SeamTarget._process_record_message`: a trimmed copy of `Target._process_record_message`
   for streams with no stream map and no flattening (the usual case). The SDK's shallow
   copy, identity transform, sink lookup, `_sdc_` stripping and `_after_process_record`
   (a DEBUG line that would print the batch context, i.e. record data) do nothing
   target-orb needs, so they are skipped; every other step is kept in the SDK's order
   (batch context, validation when on, key-property check, tallies, process_record,
   full-sink drain, max-age drain), using the sink privates `_pending_batch`,
   `_get_context`, `_validator`, `_validate_and_parse`, `_key_properties`,
   `_singer_validate_message`, `_total_records_read`, `_batch_records_read` and the
   target's `_handle_max_record_age`. It is about a fifth of the per-record cost
   (benchmarks/). Any other stream goes through the SDK unchanged. Would become: a public
   per-record fast path in the SDK, or a cheaper `_process_record_message`.
6. `SeamSink._validate_and_parse`: replaced, so that a record that does not match the
   tap's schema is logged and still mapped (schema drift must not stop a billing run; the
   SDK logs a traceback and raises) and so the SDK never parses timestamps (target-orb
   parses them itself and dead-letters the record as received). Would become: public
   `fail_on_record_validation_exception` (exists) plus a switch to turn off timestamp
   parsing.
7. `SeamSink.is_full`: reads `_batch_records_read` directly (the public `current_size`
   property costs a call per record). Would become: nothing; `current_size` is enough if
   the SDK's property gets cheaper.
8. `SeamMessageReader.process_lines`: a copy of `GenericSingerReader.process_lines` with
   one dict lookup instead of a set check per line and an actionable error for a line
   that is not JSON; it sets `_current_message` and calls `_process_unknown_message` as the
   SDK does, and decodes with `singer_sdk.contrib.msgspec.decoder` (what
   `MsgSpecReader.deserialize_json` uses). Would become: the SDK's own loop, if it did the
   cheaper check.
"""

from __future__ import annotations

import typing as t
from collections import Counter, defaultdict

import msgspec
from singer_sdk import Target
from singer_sdk.contrib.msgspec import MsgSpecReader
from singer_sdk.contrib.msgspec import decoder as _msgspec_decoder
from singer_sdk.exceptions import ConfigValidationError, InvalidInputLine
from singer_sdk.mapper import SameRecordTransform
from singer_sdk.sinks import BatchSink
from typing_extensions import override

_TYPE = frozenset({"type"})


class SeamSink(BatchSink):
    """The sink side of the seam (items 6 and 7)."""

    _seam_max_size: int = 500  # set by the subclass once the config is known

    @property
    @override
    def is_full(self) -> bool:
        return self._batch_records_read >= self._seam_max_size

    @override
    def _validate_and_parse(self, record: dict) -> dict:
        if self._validator is not None:
            self.check_record(self._validator, record)
        return record

    def check_record(self, validator: t.Any, record: dict) -> None:
        """Validate one record against the stream schema without stopping the run.

        Args:
            validator: The SDK validator from `get_validator()`.
            record: The record.
        """
        validator.validate(record)


class SeamTarget(Target):
    """The target side of the seam (items 1 to 5)."""

    _MAX_RECORD_AGE_IN_MINUTES = 1.0

    def __init__(self, *args: t.Any, **kwargs: t.Any) -> None:
        """Start with no fast-path streams.

        Args:
            args: Passed to the SDK.
            kwargs: Passed to the SDK.
        """
        self._fast_sinks: dict[str, SeamSink] = {}
        super().__init__(*args, **kwargs)

    # -- hooks for the subclass ---------------------------------------------------------

    def config_problems(self) -> list[str]:
        """Cross-field problems to report beside the schema's.

        Returns:
            Messages.
        """
        return []

    def offer_state(self, state: dict) -> None:
        """Receive the STATE `drain_all` would write.

        Args:
            state: The STATE value.
        """
        raise NotImplementedError

    def before_schema(self) -> None:
        """Called before each SCHEMA message is processed."""

    def raise_if_delivery_failed(self) -> None:
        """Called before each RECORD message is processed."""

    # -- the private SDK hooks --------------------------------------------------------------

    @override
    def _validate_config(self, *, raise_errors: bool = True) -> list[str]:
        errors = super()._validate_config(raise_errors=False)
        errors += self.config_problems()
        if errors and raise_errors:
            raise ConfigValidationError(
                "Config validation failed", errors=errors, schema=self.config_jsonschema
            )
        return errors

    @override
    def _write_state_message(self, state: dict) -> None:
        self.offer_state(state)

    @override
    def _process_schema_message(self, message_dict: dict) -> None:
        self.before_schema()
        super()._process_schema_message(message_dict)
        stream = message_dict["stream"]
        self._fast_sinks.pop(stream, None)
        maps = self.mapper.stream_maps.get(stream) or []
        if len(maps) != 1:
            return
        only = maps[0]
        if (
            type(only) is not SameRecordTransform
            or only.stream_alias != stream
            or (only.flattening_options and only.flattening_enabled)
            or not self.sink_exists(stream)
        ):
            return
        sink = self.get_sink(stream)
        if isinstance(sink, SeamSink) and not sink.include_sdc_metadata_properties:
            self._fast_sinks[stream] = sink

    @override
    def _process_record_message(self, message_dict: dict) -> None:
        self.raise_if_delivery_failed()
        sink = self._fast_sinks.get(message_dict.get("stream"))  # type: ignore[arg-type]
        record = message_dict.get("record")
        if sink is None or type(record) is not dict:
            super()._process_record_message(message_dict)
            return
        context = sink._pending_batch or sink._get_context(record)
        if sink._validator is not None:
            sink._validate_and_parse(record)
        for key in sink._key_properties:
            if key not in record:
                sink._singer_validate_message(record)  # raises the SDK's error
        sink._total_records_read += 1  # tally_record_read(), inlined
        sink._batch_records_read += 1
        sink.process_record(record, context)
        sink.record_counter_metric.increment()
        if sink.is_full:
            self.logger.debug(
                "Target sink for '%s' is full. Current size is '%s'. Draining...",
                sink.stream_name, sink.current_size,
            )
            self.drain_one(sink)
        self._handle_max_record_age()


class SeamMessageReader(MsgSpecReader):
    """Same messages, callbacks and errors as `MsgSpecReader`, less work per line (item 8)."""

    @override
    def process_lines(
        self,
        file_input: t.IO[str] | None,
        callbacks: dict[str, t.Callable[[dict], None]],
    ) -> t.Counter[str]:
        stats: dict[str, int] = defaultdict(int)
        decode = _msgspec_decoder.decode
        get_callback = callbacks.get
        number = 0
        for line in file_input or self.default_input:
            number += 1
            self._current_message = line
            try:
                message = decode(line)
            except msgspec.DecodeError as exc:
                shown = line if len(line) <= 200 else line[:200] + "…"
                msg = (
                    f"Input line {number} is not a JSON Singer message ({exc}): {shown!r}. "
                    "The tap's output is malformed; nothing after the last STATE was "
                    "acknowledged, so a rerun resends it."
                )
                raise InvalidInputLine(msg) from None
            kind = message.get("type") if type(message) is dict else None
            if kind is None:
                self.assert_line_requires(message, requires=set(_TYPE))
            callback = get_callback(kind)
            if callback is not None:
                callback(message)
            else:
                self._process_unknown_message(message)
            stats[kind] += 1
        return Counter(**stats)
