"""TargetOrb: settings and wiring, the STATE gate hook, signals, and the end-of-run summary."""

from __future__ import annotations

import gc
import logging
import os
import signal
import sys
import threading
import typing as t

from singer_sdk import Target
from singer_sdk.exceptions import (
    ConfigValidationError,
    InvalidInputLine,
    MissingKeyPropertiesError,
    RecordsWithoutSchemaException,
)
from singer_sdk.helpers.capabilities import PluginCapabilities, TargetCapabilities
from singer_sdk.mapper import SameRecordTransform
from singer_sdk.plugin_base import _ConfigInput
from typing_extensions import override

from target_orb import jsonutil
from target_orb.backfill import BackfillManager, OwnershipRecord, record_path_for
from target_orb.client import OrbClient
from target_orb.deadletter import DeadLetterWriter
from target_orb.delivery import Deliverer
from target_orb.errors import (
    DeliveryAbortedError,
    OrbFatalError,
    OrbInvalidEventError,
    OrbRetryExhaustedError,
    TerminatedError,
)
from target_orb.ledger import Ledger
from target_orb.ledger import default_url as ledger_default_url
from target_orb.ledger import describe as ledger_describe
from target_orb.mapping import backfill_threshold
from target_orb.pipeline import Pipeline
from target_orb.ratelimit import RateLimiter
from target_orb.reader import OrbMessageReader
from target_orb.settings import (
    CONFIG_SCHEMA,
    build_delivery_settings,
    build_mapping_spec,
    config_problems,
    load_method,
)
from target_orb.sinks import OrbSink
from target_orb.stats import RunStats
from target_orb.upsert import LiveOrbPort, Upserter

if t.TYPE_CHECKING:
    from types import FrameType


_EXPECTED_ERRORS = (
    OrbFatalError,
    OrbRetryExhaustedError,
    OrbInvalidEventError,
    # Malformed Singer input: the SDK's own messages say what is wrong.
    InvalidInputLine,
    MissingKeyPropertiesError,
    RecordsWithoutSchemaException,
)


def _tune_gc() -> None:
    """Make Python's cyclic garbage collector run rarely during a CLI run.

    Records, events and batches are acyclic and freed by reference counting; with the
    default thresholds the collector still walks every in-flight batch thousands of times.
    Freezing the start-up objects and raising the young-generation threshold measured
    +17-25% records/s on the benchmark (benchmarks/README.md) at the same peak RSS.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 50, 100)


class _Runtime:
    """What all sinks share: the mapping spec, counters, the pipeline and the client."""

    def __init__(self, target: TargetOrb) -> None:
        config = target.config
        self.spec = build_mapping_spec(config)
        self.settings_config = config
        self.settings = build_delivery_settings(config)
        self.stats = RunStats()
        self.logger = target.logger
        self.dead_letters = DeadLetterWriter(self.settings.dead_letter_path)
        self.client: OrbClient | None = None
        self._started = False
        self._derived_warned = False
        deliverer = None
        s = self.settings
        self.ingest_limiter: RateLimiter | None = None
        # Orb budgets each kind of call separately (reference/orb-api.md §2.8): ingest, other
        # writes (backfill create/close, customer updates, amend/deprecate) and reads (search).
        self.write_limiter = RateLimiter()
        self.read_limiter = RateLimiter()
        if not s.dry_run:
            self.client = OrbClient(
                s.api_url, config["api_key"], timeout=s.request_timeout,
                pool_size=s.max_concurrent_requests,
            )
            limiter = self.ingest_limiter = RateLimiter(
                requests_per_second=s.max_requests_per_second,
                events_per_minute=s.max_events_per_minute,
            )
            deliverer = Deliverer(
                self.client.post_ingest,
                url=self.client.ingest_url,
                max_retry_seconds=s.max_retry_seconds,
                # The pipeline is built below; bind late.
                sleep=lambda seconds: self.pipeline.sleep(seconds),  # noqa: PLW0108
                limiter=limiter,
                on_retry=self.stats.add_retry,
            )
        # Retries for every Orb call (`deliverer.request` for calls other than ingest).
        self.deliverer: Deliverer | None = deliverer
        self.pipeline = Pipeline(
            deliverer=deliverer,
            dead_letters=self.dead_letters,
            stats=self.stats,
            invalid_policy=s.invalid_event_policy,
            max_in_flight=s.max_concurrent_requests,
            state_writer=target.write_state_line,
            dry_run=s.dry_run,
            ingest_url=f"{s.api_url}/ingest",
            interrupt_main_on_failure=target.is_cli_run,
            progress_interval=s.progress_interval_seconds,
        )
        self.backfills: BackfillManager | None = None
        if self.spec.late_event_policy == "backfill":
            self.backfills = BackfillManager(
                client=self.client,
                deliverer=deliverer,
                make_ingest_deliverer=self._backfill_ingest_deliverer if self.client else None,
                stats=self.stats,
                record=OwnershipRecord(record_path_for(s.dead_letter_path), s.api_url),
                write_limiter=self.write_limiter,
                read_limiter=self.read_limiter,
                grace_period_hours=self.spec.grace_period_hours,
                max_retry_seconds=s.max_retry_seconds,
                aborted=lambda: self.pipeline.sleep(0),
            )
        # `load_method: upsert` (README "Corrections"); None keeps append-only untouched.
        self.corrections: Upserter | None = None
        self.ledger: Ledger | None = None
        if load_method(config) == "upsert" and self.client is not None and deliverer is not None:
            self.ledger = Ledger(config.get("ledger_url") or ledger_default_url(s.dead_letter_path))
            self.corrections = Upserter(
                spec=self.spec,
                ledger=self.ledger,
                port=LiveOrbPort(
                    self.client, deliverer,
                    write_limiter=self.write_limiter, read_limiter=self.read_limiter,
                ),
                pipeline=self.pipeline,
                deprecate_deleted_events=bool(config.get("deprecate_deleted_events")),
                aborted=lambda: self.pipeline.error is not None,
                note_derived_key=self.note_derived_key,
                run_stats=self.stats,
                late_threshold=(
                    (lambda now: backfill_threshold(now, self.spec.grace_period_hours))
                    if self.spec.late_event_policy == "backfill" else None
                ),
                backfill_load=(
                    (lambda stream, events, records: backfills.load_job(stream, events, records)())
                    if (backfills := self.backfills) is not None else None
                ),
            )

    def _backfill_ingest_deliverer(self, send: t.Callable[[bytes, int], t.Any]) -> Deliverer:
        """Ingest into one backfill: ingest's retry rules, budget and rate limits."""
        assert self.client is not None
        return Deliverer(
            send,
            url=f"{self.client.ingest_url}?backfill_id=…",
            max_retry_seconds=self.settings.max_retry_seconds,
            sleep=lambda seconds: self.pipeline.sleep(seconds),  # noqa: PLW0108
            limiter=self.ingest_limiter,
            on_retry=self.stats.add_retry,
        )

    def finish_backfills(self, *, failed: bool, budget: float = 60.0) -> None:
        """Close every backfill this run created; on every exit path, once (never raises).

        On failure the delivery threads are stopped first, so nothing is sent into a
        backfill while it is being closed.

        Args:
            failed: The run failed or was stopped.
            budget: Seconds of retries for each close call.
        """
        if self.backfills is None:
            return
        if failed:
            self.pipeline.close(timeout=1.0)
        closer = None
        if self.client is not None:
            closer = Deliverer(
                self.client.post_ingest,
                url=self.client.ingest_url,
                max_retry_seconds=min(float(self.settings.max_retry_seconds), budget),
                on_retry=self.stats.add_retry,
            )
        self.backfills.finish(failed=failed, closer=closer)

    def ensure_started(self) -> None:
        """Check the dead-letter path, then ping Orb once (never in dry-run mode).

        Raises:
            OrbFatalError: The dead-letter file cannot be written, or the ping failed.
        """
        if self._started:
            return
        self._started = True
        problem = self.dead_letters.check_writable()
        if problem is not None:
            raise OrbFatalError(problem + " Nothing was read or sent.")
        if self.ledger is not None:
            self.ledger.open()
            self.logger.info(
                "load_method upsert: corrections ledger at %s.", ledger_describe(self.ledger.url)
            )
            if self.ledger.created:
                self.logger.warning(
                    "The corrections ledger is new (%s): keys it does not know are looked up "
                    "in Orb, whose search cannot see events that were already amended. If "
                    "events of this Orb account were amended through another ledger, point "
                    "`ledger_url` at that ledger.", ledger_describe(self.ledger.url),
                )
        if self.backfills is not None:
            self.backfills.start()
        if self.client is not None:
            self.client.ping()
        else:
            self.logger.info("DRY RUN: no request will be made to Orb (no ping, no ingest).")
            if load_method(self.settings_config) == "upsert":
                self.logger.info(
                    "DRY RUN: load_method upsert decides nothing in a dry run (no ledger, no "
                    "search); the payloads below are shown as new events.",
                )

    def note_derived_key(self, stream: str) -> None:
        self.stats.keys_derived += 1
        if not self._derived_warned:
            self._derived_warned = True
            self.logger.warning(
                "Stream '%s': a record has no idempotency key at `%s`; sending a "
                "deterministic sha256 of (stream, customer, event, timestamp, properties) "
                "instead. Identical events without a key will count once.",
                stream, self.spec.idempotency_key_field,
            )

    def summary(self, *, failed: bool) -> None:
        text = self.stats.summary(
            dead_letter_path=self.dead_letters.path,
            dry_run=self.settings.dry_run,
            failed=failed,
        )
        metrics = self.stats.as_dict()
        if self.corrections is not None:
            text += "\n" + "\n".join(self.corrections.stats.summary_lines())
            metrics["corrections"] = self.corrections.stats.as_dict()
        self.logger.info(text)
        self.logger.info("target-orb metrics: %s", jsonutil.dumps_str(metrics))

    def finish(self) -> None:
        """After a successful run: prune ledger entries past Orb's correction window."""
        if self.ledger is not None:
            pruned = self.ledger.prune()
            if pruned:
                self.logger.info("Corrections ledger: pruned %d entries past Orb's correction "
                                 "window.", pruned)

    def shutdown(self, timeout: float = 5.0) -> None:
        self.pipeline.close(timeout)
        if self.client is not None:
            self.client.close()
        if self.ledger is not None:
            self.ledger.close()


class TargetOrb(Target):
    """Singer target that sends Segment-shaped Track events to Orb's usage-event ingestion."""

    name = "target-orb"
    package_name = "target-orb"
    config_jsonschema = CONFIG_SCHEMA
    default_sink_class = OrbSink
    message_reader_class = OrbMessageReader
    # No `schema-flattening`: it would turn `properties.x` into `properties__x` keys.
    capabilities: t.ClassVar[list] = [  # type: ignore[misc]
        PluginCapabilities.ABOUT,
        PluginCapabilities.STREAM_MAPS,
        PluginCapabilities.STRUCTURED_LOGGING,
        TargetCapabilities.VALIDATE_RECORDS,
    ]
    # The SDK drains every sink (and so offers STATE) this often while records arrive.
    # STATE itself is written as soon as Orb acknowledged what precedes it.
    _MAX_RECORD_AGE_IN_MINUTES = 1.0
    is_cli_run = False

    def __init__(self, *args: t.Any, **kwargs: t.Any) -> None:
        """Validate the config, then build the shared runtime.

        Args:
            args: Passed to the SDK.
            kwargs: Passed to the SDK.
        """
        self._stdout_lock = threading.Lock()
        self._fast_sinks: dict[str, OrbSink] = {}
        super().__init__(*args, **kwargs)
        # process_batch only queues work, so parallel drains would add nothing.
        self.max_parallelism = 1
        self.runtime = _Runtime(self)

    @override
    def _validate_config(self, *, raise_errors: bool = True) -> list[str]:
        """Schema errors and cross-field problems, reported together in one error."""
        errors = super()._validate_config(raise_errors=False)
        errors += config_problems(self._config)
        if errors and raise_errors:
            raise ConfigValidationError(
                "Config validation failed", errors=errors, schema=self.config_jsonschema
            )
        return errors

    def write_state_line(self, state: dict) -> None:
        """Write one STATE line (Decimal-safe, unlike the SDK's json.dumps: sdk#3787).

        Args:
            state: The STATE value.
        """
        line = jsonutil.dumps_lenient(state)
        with self._stdout_lock:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()

    @override
    def _write_state_message(self, state: dict) -> None:
        # drain_all calls this after queueing every sink's batch: hold it until acked.
        self.runtime.pipeline.offer_state(state)

    @override
    def _process_record_message(self, message_dict: dict) -> None:
        """The SDK's record path, minus the work that is a no-op for target-orb.

        For a stream with no stream map and no flattening (the usual case), the SDK's
        shallow copy, identity transform, sink lookup and `_sdc_` stripping do nothing
        target-orb needs (the mapping ignores `_sdc_*` keys), so this path skips them and
        keeps every other step in the SDK's order: batch context, validation (when on),
        key-property check, tallies, process_record, full-sink drain and max-age drain.
        Any other stream goes through the SDK unchanged.
        """
        pipeline = self.runtime.pipeline
        if pipeline.error is not None:
            pipeline.raise_if_failed()
        sink = self._fast_sinks.get(message_dict.get("stream"))  # type: ignore[arg-type]
        record = message_dict.get("record")
        if sink is None or type(record) is not dict:
            super()._process_record_message(message_dict)
            return
        context = sink._pending_batch or sink._get_context(record)  # noqa: SLF001
        if sink._validator is not None:  # noqa: SLF001
            sink._validate_and_parse(record)  # noqa: SLF001
        for key in sink._key_properties:  # noqa: SLF001
            if key not in record:
                sink._singer_validate_message(record)  # noqa: SLF001 - raises the SDK's error
        sink._total_records_read += 1  # noqa: SLF001 - tally_record_read(), inlined
        sink._batch_records_read += 1  # noqa: SLF001
        sink.process_record(record, context)
        sink.record_counter_metric.increment()
        if sink.is_full:
            self.logger.debug(
                "Target sink for '%s' is full. Current size is '%s'. Draining...",
                sink.stream_name, sink.current_size,
            )
            self.drain_one(sink)
        self._handle_max_record_age()

    @override
    def _process_schema_message(self, message_dict: dict) -> None:
        self.runtime.ensure_started()
        super()._process_schema_message(message_dict)
        stream = message_dict["stream"]
        self._fast_sinks.pop(stream, None)
        maps = self.mapper.stream_maps.get(stream) or []
        if len(maps) == 1:
            only = maps[0]
            sink = self._sinks_active.get(only.stream_alias)
            if (
                type(only) is SameRecordTransform
                and only.stream_alias == stream
                and not (only.flattening_options and only.flattening_enabled)
                and isinstance(sink, OrbSink)
                and not sink.include_sdc_metadata_properties
            ):
                self._fast_sinks[stream] = sink

    @override
    def process_endofpipe(self) -> None:
        super().process_endofpipe()
        self.runtime.pipeline.wait_all()
        # Every late event is in its backfill (or dead-lettered): close them now.
        self.runtime.finish_backfills(failed=False)
        self.runtime.pipeline.close()
        self.runtime.finish()

    @override
    def _handle_termination(self, signum: int, frame: FrameType | None) -> None:
        """Stop reading at once; never acknowledge a batch that is still in flight (sdk#3775).

        The SDK's handler drains and exits 0, which can emit STATE for an unfinished
        batch or hide a failure. Here a delivery failure is re-raised, and a real signal
        becomes TerminatedError; STATE already written covers only settled requests.
        """
        runtime = getattr(self, "runtime", None)
        if runtime is not None and runtime.pipeline.error is not None:
            if runtime.pipeline.error_reported:
                return  # the reading thread already has the error; this is its echo
            runtime.pipeline.raise_if_failed()
        raise TerminatedError(signum)

    @classmethod
    @override
    def invoke(  # type: ignore[override]
        cls,
        *,
        about: bool = False,
        about_format: str | None = None,
        config: _ConfigInput | None = None,
        file_input: t.IO[str] | None = None,
    ) -> None:
        """Run the target from the CLI with clear errors and exit codes.

        Exit codes: 0 success; 1 a delivery, configuration or data error (message logged,
        no traceback); 128+N after signal N.
        """
        if about:
            cls.print_about(about_format)
            sys.exit(0)
        cls.is_cli_run = True
        target: TargetOrb | None = None
        failed = True
        try:
            config = config or _ConfigInput()
            cls.print_version(print_fn=cls.logger.info)
            target = cls(
                config=config.config, validate_config=True, parse_env_config=config.parse_env
            )
            target.runtime.ensure_started()
            _tune_gc()
            target.listen(file_input)
            failed = False
        except _EXPECTED_ERRORS as exc:
            cls._fail(target, str(exc))
        except DeliveryAbortedError:
            cls._fail(target, "delivery was aborted")
        except TerminatedError as exc:
            cls._terminated(target, exc.signum)
        except KeyboardInterrupt:
            cls._terminated(target, signal.SIGINT)
        except OSError as exc:
            cls._fail(target, f"I/O error: {exc}. Check `dead_letter_path` and disk space.")
        finally:
            cls._ignore_signals()
            if target is not None:
                target.runtime.finish_backfills(failed=failed)
                target.runtime.summary(failed=failed)
                target.runtime.shutdown()

    @staticmethod
    def _ignore_signals() -> None:
        """Once the run is ending, a late signal (or a delivery thread's interrupt) must not
        raise inside the shutdown path."""
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                signal.signal(signum, signal.SIG_IGN)

    @classmethod
    def _fail(cls, target: TargetOrb | None, message: str) -> t.NoReturn:
        cls._ignore_signals()
        pending = target.runtime.pipeline.unacknowledged if target else 0
        cls.logger.error("target-orb failed: %s", message)
        if pending:
            cls.logger.error(
                "%d events were in flight and are unacknowledged; no STATE covers them. A "
                "rerun resends them under the same idempotency keys (Orb deduplicates).",
                pending,
            )
        if target is not None:
            target.runtime.finish_backfills(failed=True)
            target.runtime.summary(failed=True)
            target.runtime.shutdown(timeout=1.0)
        logging.shutdown()
        sys.stdout.flush()
        os._exit(1)

    @classmethod
    def _terminated(cls, target: TargetOrb | None, signum: int) -> t.NoReturn:
        cls._ignore_signals()
        pending = target.runtime.pipeline.unacknowledged if target else 0
        cls.logger.error(
            "Stopped by signal %d. %d events in flight were not acknowledged and no STATE "
            "covers them or anything after them; rerun to resend (same idempotency keys).",
            signum, pending,
        )
        if target is not None:
            target.runtime.finish_backfills(failed=True, budget=15.0)
            target.runtime.summary(failed=True)
            target.runtime.shutdown(timeout=1.0)
        logging.shutdown()
        sys.stdout.flush()
        os._exit(128 + int(signum))
