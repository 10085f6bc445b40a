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
2. `SeamTarget._validate_config`: first `prepare_config` (unknown keys; object and array
   settings given as JSON text are parsed into `_config`), then the SDK's schema errors
   (except those about a value `prepare_config` already reported; those about a secret
   setting without the value the SDK's message quotes), then the cross-field
   problems (`config_problems`), so the user gets one `ConfigValidationError` listing every
   problem, and "Config validation failed" once (the SDK's own call with
   `raise_errors=False` logs it as a WARNING before the CLI logs it again as an ERROR).
   Would become: a public `validate_config()` hook returning extra errors.
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
   `MsgSpecReader.deserialize_json` uses). It reads bytes from the file descriptor
   (target_orb/singer/reader.py `input_lines`, so bytes that are not UTF-8 reach the careful path
   instead of raising in the SDK's text stream, and a quiet tap is noticed), reads what
   Python's json reads when msgspec refuses a line (`read_careful`), and fails any line
   that is not a Singer message with its number and an excerpt. Would become: the SDK's
   own loop, if it did the cheaper check and had a hook for undecodable lines.
9. `SeamTarget.take_unreadable_record`: a RECORD holding NaN, lone surrogates or bytes
   that are not UTF-8 joins its sink's batch as invalid (dead-lettered in order, before
   STATE passes it), with the SDK's `_assert_sink_exists` check and the sink's
   `_pending_batch`/`_get_context`, then the SDK's full-sink and `_handle_max_record_age`
   drains. Would become: a public hook for records the reader rejects.
10. `SeamTarget.flush_idle`: counts what `_sinks_active` hold, then `drain_all()` (public),
   when the tap sent nothing for `flush_interval_seconds`. Would become: a public list of
   active sinks (and the SDK draining on idle input itself, sdk#2692-style).
   `MsgSpecReader.deserialize_json` uses). Would become: the SDK's own loop, if it did the
   cheaper check.
11. `SeamSink._remove_sdc_metadata_from_record`: extended, not copied: the SDK strips the
   `_sdc_*` columns (when `add_record_metadata` is off) on its own record path, streams with
   a stream map included, and `_sdc_deleted_at` with them; under `load_method: upsert` that
   column marks a deleted row, so it is put back (the mapping never sends `_sdc_*` keys).
   Would become: a public switch to keep chosen metadata columns.
12. `SeamTarget._env_var_config` (a `classproperty`, from `singer_sdk.helpers._classproperty`):
   under `--config ENV`, the SDK's `parse_environment_config` (imported from
   `singer_sdk.configuration._dict_config`) reads object and array settings as JSON and
   raises a traceback on bad JSON; here they are read as text, which `_validate_config`
   parses with a message naming the setting and its shape. `TARGET_ORB_*` variables that
   name no setting are logged as warnings (`_env_var_prefix`). Would become: a public hook
   for environment parsing.
"""

from __future__ import annotations

import copy
import logging
import os
import sys
import typing as t
from collections import Counter, defaultdict

import msgspec
from singer_sdk import Target
from singer_sdk.configuration._dict_config import parse_environment_config
from singer_sdk.contrib.msgspec import MsgSpecReader
from singer_sdk.contrib.msgspec import decoder as _msgspec_decoder
from singer_sdk.exceptions import ConfigValidationError, InvalidInputLine
from singer_sdk.helpers._classproperty import classproperty
from singer_sdk.mapper import SameRecordTransform
from singer_sdk.sinks import BatchSink
from typing_extensions import override

from target_orb.config_checks import structured_shape, unknown_env_vars
from target_orb.singer.reader import InvalidRecordHandler, bad_line, input_lines, read_careful

# Named as before the package had folders: log lines and logging configs name it.
LOGGER = logging.getLogger("target_orb.reader")


class SeamSink(BatchSink):
    """The sink side of the seam (items 6, 7 and 9)."""

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

    def reject_record(self, record: dict, context: dict, code: str, reason: str) -> None:
        """Take a record the reader could not read as it is into `context` as invalid.

        Args:
            record: A JSON-safe copy of the record.
            context: The sink's current batch.
            code: Why, as a counter name.
            reason: Why, in words.
        """
        raise NotImplementedError
    @override
    def _remove_sdc_metadata_from_record(self, record: dict) -> None:
        deleted = record.get("_sdc_deleted_at")
        super()._remove_sdc_metadata_from_record(record)
        if deleted is not None:
            record["_sdc_deleted_at"] = deleted

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
        reader = self.message_reader
        if isinstance(reader, SeamMessageReader):
            reader.on_invalid_record = self.take_unreadable_record
            reader.on_idle = self.flush_idle

    # -- hooks for the subclass ---------------------------------------------------------

    def config_problems(self) -> list[str]:
        """Cross-field problems to report beside the schema's.

        Returns:
            Messages.
        """
        return []

    def prepare_config(
        self, config: dict[str, t.Any], properties: t.Mapping[str, t.Any]
    ) -> tuple[dict[str, t.Any], list[str], frozenset[str]]:
        """Check the config before the schema does, and return the config to validate.

        Args:
            config: A copy of the config as given.
            properties: The config schema's properties (the SDK's built-in ones included).

        Returns:
            The config to use, problems, and the settings those problems are about (the
            schema's errors about them are left out).
        """
        return config, [], frozenset()

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

    def before_idle_flush(self, buffered: int) -> None:
        """Called on the reading thread before an idle flush drains every sink.

        Args:
            buffered: Records waiting in the sinks.
        """

    # -- what the reader calls (items 9 and 10) -------------------------------------------

    def take_unreadable_record(self, message: dict, code: str, reason: str) -> None:
        """A RECORD whose values JSON cannot carry: into its sink's batch as invalid, in order.

        Args:
            message: The RECORD message, with a JSON-safe copy of the record.
            code: Why, as a counter name.
            reason: Why, in words.
        """
        stream = message["stream"]
        if stream not in self.mapper.stream_maps:
            self._assert_sink_exists(stream)
        maps = self.mapper.stream_maps.get(stream) or []
        alias = maps[0].stream_alias if maps else stream
        self._assert_sink_exists(alias)
        sink = self.get_sink(alias)
        if not isinstance(sink, SeamSink):
            return
        record = message["record"]
        context = sink._pending_batch or sink._get_context(record)
        sink.tally_record_read()
        sink.reject_record(record, context, code, reason)
        if sink.is_full:
            self.drain_one(sink)
        self._handle_max_record_age()

    def flush_idle(self) -> None:
        """No input for a while: drain every sink (STATE follows through `offer_state`)."""
        buffered = sum(sink.current_size for sink in self._sinks_active.values())
        self.before_idle_flush(buffered)
        self.drain_all()

    # -- the private SDK hooks --------------------------------------------------------------

    @override
    def _validate_config(self, *, raise_errors: bool = True) -> list[str]:
        schema = self.config_jsonschema
        self.append_builtin_config(schema)
        config, errors, reported = self.prepare_config(
            dict(self._config), schema.get("properties", {})
        )
        self._config = config
        secrets = {
            name for name, prop in schema.get("properties", {}).items()
            if isinstance(prop, dict) and (prop.get("secret") or prop.get("writeOnly"))
        }
        try:
            super()._validate_config(raise_errors=True)
        except ConfigValidationError as exc:
            for error in exc.errors:
                if any(f"in config[{name!r}]" in error for name in reported):
                    continue
                secret = next((n for n in secrets if f"in config[{n!r}]" in error), None)
                kinds = schema["properties"][secret].get("type") if secret else None
                errors.append(
                    error if secret is None  # else: the SDK's message quotes the value
                    else f"`{secret}` is not valid (expected {' or '.join(map(str, kinds or []))}"
                    "); its value is secret and not shown."
                )
        errors += self.config_problems()
        if errors:
            if raise_errors:
                raise ConfigValidationError(
                    "Config validation failed", errors=errors, schema=schema
                )
            self.logger.warning("Config validation failed: %s", " ".join(errors))
        return errors

    @classproperty
    def _env_var_config(cls) -> dict[str, t.Any]:
        schema = copy.deepcopy(cls.config_jsonschema)
        cls.append_builtin_config(schema)
        properties = schema.setdefault("properties", {})
        for name, prop in list(properties.items()):
            if structured_shape(prop) is not None:
                properties[name] = {"type": ["string", "null"]}  # parsed in _validate_config
        config = parse_environment_config(schema, cls._env_var_prefix)
        for warning in unknown_env_vars(os.environ, cls._env_var_prefix, set(properties)):
            cls.logger.warning("%s", warning)
        return config

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
    """Same messages and callbacks as `MsgSpecReader`, less work per line, tolerant input
    (items 8 and 9).

    The target sets `on_invalid_record` (a RECORD whose values JSON cannot carry: NaN,
    lone surrogates, bytes that are not UTF-8), `on_idle` and `idle_seconds` (flush partial
    batches when the tap goes quiet); see target_orb/singer/reader.py.
    """

    on_invalid_record: InvalidRecordHandler | None = None
    on_idle: t.Callable[[], None] | None = None
    idle_seconds: float = 0.0

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
        source = file_input if file_input is not None else sys.stdin
        for line in input_lines(source, self):
            number += 1
            self._current_message = line  # type: ignore[assignment]  # bytes: raw input
            try:
                message = decode(line)
            except (msgspec.DecodeError, RecursionError):
                message = read_careful(line, number, self.on_invalid_record)
                if message is None:
                    continue  # whitespace only, or an invalid record handed over
            if type(message) is not dict:
                raise bad_line(number, line, "is not a JSON object (a Singer message)")
            kind: t.Any = message.get("type")
            try:
                callback = get_callback(kind)
            except TypeError:  # unhashable `type`
                callback = None
            if callback is None:
                if type(kind) is not str:
                    raise bad_line(number, line, "has no message type (a string `type`)")
                raise bad_line(
                    number, line, f"has an unknown message type {kind[:40]!r} (expected "
                    "SCHEMA, RECORD, STATE, ACTIVATE_VERSION or BATCH)",
                )
            try:
                callback(message)
            except InvalidInputLine as exc:  # the SDK's checks (missing `stream`, …)
                if str(exc).startswith("Input line "):
                    raise
                raise bad_line(number, line, f"is not a valid Singer message ({exc})") from None
            except (KeyError, TypeError, AttributeError, ValueError, IndexError) as exc:
                if type(exc).__module__.startswith("target_orb"):
                    raise
                LOGGER.debug("Input line %d failed", number, exc_info=True)
                detail = str(exc)[:200] or type(exc).__name__
                raise bad_line(
                    number, line,
                    f"could not be processed ({type(exc).__name__}: {detail}); check that it "
                    "is a well-formed Singer message",
                ) from None
            stats[kind] += 1
        return Counter(**stats)
