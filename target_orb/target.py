"""TargetOrb: settings and wiring, the STATE gate hook, signals, and the end-of-run summary."""

from __future__ import annotations

import copy
import gc
import logging
import os
import signal
import sys
import threading
import typing as t

from singer_sdk.exceptions import (
    InvalidInputLine,
    MissingKeyPropertiesError,
    RecordsWithoutSchemaException,
)
from singer_sdk.helpers.capabilities import PluginCapabilities, TargetCapabilities
from typing_extensions import override

from target_orb import jsonutil
from target_orb.backfill.manager import BackfillManager, OwnershipRecord, record_path_for
from target_orb.corrections.upsert import LiveOrbPort, Upserter
from target_orb.errors import (
    DeliveryAbortedError,
    OrbFatalError,
    OrbInvalidEventError,
    OrbRetryExhaustedError,
    StateWriteError,
    TerminatedError,
)
from target_orb.identify.customers import CustomerUpdater
from target_orb.mapping.track import backfill_threshold
from target_orb.mapping.traits import build_identify_spec
from target_orb.orb.client import OrbClient
from target_orb.orb.delivery import Deliverer
from target_orb.orb.ratelimit import RateLimiter
from target_orb.pipeline.deadletter import DeadLetterWriter
from target_orb.pipeline.gate import Pipeline
from target_orb.pipeline.stats import RunStats
from target_orb.settings import (
    CONFIG_SCHEMA,
    build_delivery_settings,
    build_mapping_spec,
    check_config_keys,
    load_method,
    state_url,
)
from target_orb.settings import config_problems as cross_field_problems
from target_orb.singer.sdk_seam import SeamMessageReader, SeamTarget
from target_orb.sinks import OrbSink
from target_orb.state.ledger import Ledger
from target_orb.state.ledger import default_url as ledger_default_url
from target_orb.state.ledger import describe as ledger_describe

if t.TYPE_CHECKING:
    from types import FrameType


_EXPECTED_ERRORS = (
    OrbFatalError,
    OrbRetryExhaustedError,
    OrbInvalidEventError,
    StateWriteError,
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
        # One abort signal for the run: set on the first delivery failure and on close, it
        # ends every retry wait (ingest and other calls) at once.
        self.abort = threading.Event()
        self.ingest_limiter: RateLimiter | None = None
        # Orb budgets each kind of call separately (Orb's rate-limit page): ingest; writes,
        # which are every POST/PUT/PATCH/DELETE but ingest (search, backfill create/close,
        # customer updates, amend/deprecate); and reads (GET: backfill list/fetch, invoices).
        # Each paces itself to what Orb allows once Orb answers 429 (target_orb.orb.ratelimit).
        self.write_limiter = RateLimiter(name="writes", unit="requests")
        self.read_limiter = RateLimiter(name="reads", unit="requests")
        if not s.dry_run:
            self.client = OrbClient(
                s.api_url, config["api_key"], timeout=s.request_timeout,
                pool_size=s.max_concurrent_requests,
            )
            limiter = self.ingest_limiter = RateLimiter(
                requests_per_second=s.max_requests_per_second,
                events_per_minute=s.max_events_per_minute,
                name="ingest",
                unit="events",
            )
            deliverer = Deliverer(
                self.client.post_ingest,
                url=self.client.ingest_url,
                max_retry_seconds=s.max_retry_seconds,
                abort=self.abort,
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
            abort=self.abort,
            dry_run=s.dry_run,
            ingest_url=f"{s.api_url}/ingest",
            interrupt_main_on_failure=target.is_cli_run,
            progress_interval=s.progress_interval_seconds,
        )
        self._summarized = False
        # target-orb's own store (`state_url`): the corrections ledger under upsert, and the
        # keys target-orb delivered under `late_event_policy: backfill`.
        self.ledger: Ledger | None = None
        if self.client is not None and (
            load_method(config) == "upsert" or self.spec.late_event_policy == "backfill"
        ):
            self.ledger = Ledger(state_url(config, ledger_default_url(s.dead_letter_path)))
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
                ledger=self.ledger,
                issued_policy=str(config.get("issued_period_policy") or "backfill"),
                aborted=self.abort.is_set,
            )
        # `load_method: upsert` (README "Corrections"); None keeps append-only untouched.
        self.corrections: Upserter | None = None
        if (
            load_method(config) == "upsert" and self.ledger is not None
            and self.client is not None and deliverer is not None
        ):
            self.corrections = Upserter(
                spec=self.spec,
                ledger=self.ledger,
                port=LiveOrbPort(self.client, deliverer, write_limiter=self.write_limiter),
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
        # Identify → customer metadata; None under `identify_policy: skip` (nothing changes).
        self.identify = build_identify_spec(config, self.spec)
        self.customers = CustomerUpdater(
            client=self.client,
            deliverer=deliverer,
            pipeline=self.pipeline,
            limiter=self.write_limiter,
            stats=self.stats,
            api_url=s.api_url,
        )

    def _backfill_ingest_deliverer(self, send: t.Callable[[bytes, int], t.Any]) -> Deliverer:
        """Ingest into one backfill: ingest's retry rules, budget and rate limits."""
        assert self.client is not None
        return Deliverer(
            send,
            url=f"{self.client.ingest_url}?backfill_id=…",
            max_retry_seconds=self.settings.max_retry_seconds,
            abort=self.abort,
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
        if self.settings_config.get("ledger_url") and not self.settings_config.get("state_url"):
            self.logger.warning(
                "`ledger_url` is the earlier name of `state_url`; it still works, but rename "
                "it to `state_url` (TARGET_ORB_STATE_URL)."
            )
        if self.ledger is not None:
            self.ledger.open()
            self.logger.info(
                "target-orb's store (`state_url`): %s.", ledger_describe(self.ledger.url)
            )
            if self.ledger.created and self.corrections is not None:
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

    def close(self, timeout: float = 5.0) -> None:
        """Stop the delivery threads and the HTTP client (idempotent); the one way down.

        Args:
            timeout: Seconds to wait for each delivery thread.
        """
        self.pipeline.close(timeout)
        if self.client is not None:
            self.client.close()
        if self.ledger is not None:
            self.ledger.close()

    def finish(
        self, *, failed: bool, timeout: float = 5.0, backfill_budget: float = 60.0
    ) -> None:
        """End the run: close this run's backfills, close, then log the summary once.

        Args:
            failed: The run failed or was stopped (marks the summary too).
            timeout: Seconds to wait for each delivery thread.
            backfill_budget: Seconds of retries for each backfill close call.
        """
        self.finish_backfills(failed=failed, budget=backfill_budget)
        self.close(timeout)
        if self._summarized:
            return
        self._summarized = True
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

    def prune_ledger(self) -> None:
        """After a successful run: prune ledger entries past Orb's correction window."""
        if self.ledger is not None:
            pruned = self.ledger.prune()
            if pruned:
                self.logger.info("Corrections ledger: pruned %d entries past Orb's correction "
                                 "window.", pruned)


class TargetOrb(SeamTarget):
    """Singer target that sends Segment-shaped Track events to Orb's usage-event ingestion."""

    name = "target-orb"
    package_name = "target-orb"
    # A copy: the SDK adds its built-in settings (stream_maps, load_method…) to this dict in
    # place, and settings.CONFIG_SCHEMA stays target-orb's own declarations.
    config_jsonschema = copy.deepcopy(CONFIG_SCHEMA)
    default_sink_class = OrbSink
    message_reader_class = SeamMessageReader
    # No `schema-flattening`: it would turn `properties.x` into `properties__x` keys.
    capabilities: t.ClassVar[list] = [
        PluginCapabilities.ABOUT,
        PluginCapabilities.STREAM_MAPS,
        PluginCapabilities.STRUCTURED_LOGGING,
        TargetCapabilities.VALIDATE_RECORDS,
    ]
    is_cli_run = False
    cli_target: t.ClassVar[TargetOrb | None] = None

    def __init__(self, *args: t.Any, **kwargs: t.Any) -> None:
        """Validate the config, then build the shared runtime.

        In a CLI run, also check the dead-letter path and ping Orb, so a wrong key or URL
        fails before any input is read.

        Args:
            args: Passed to the SDK.
            kwargs: Passed to the SDK.
        """
        self._stdout_lock = threading.Lock()
        super().__init__(*args, **kwargs)
        # process_batch only queues work, so parallel drains would add nothing.
        self.max_parallelism = 1
        self.runtime = _Runtime(self)
        # Replace the SDK's handlers (they drain and exit 0, which can write STATE for an
        # unfinished batch or hide a failure: sdk#3775).
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                signal.signal(signum, self._on_signal)
        # Idle flush: the reader calls `flush_idle` (the seam) after this long without input.
        reader = self.message_reader
        if isinstance(reader, SeamMessageReader):
            reader.idle_seconds = self.runtime.settings.flush_interval_seconds
        if self.is_cli_run:
            type(self).cli_target = self
            self.runtime.ensure_started()
            _tune_gc()

    # -- the seam's hooks (target_orb/singer/sdk_seam.py) -----------------------------------------

    @override
    def before_idle_flush(self, buffered: int) -> None:
        """No input for `flush_interval_seconds`: say so, then the seam drains every sink.

        Runs on the reading thread (the reader calls it while waiting for input), so it
        never races the record path. STATE follows once Orb acknowledged what precedes it.
        """
        pipeline = self.runtime.pipeline
        if pipeline.error is not None:
            pipeline.raise_if_failed()
        log = self.logger.info if buffered else self.logger.debug
        log(
            "No input for %g s: sending %d buffered records now; STATE follows once Orb "
            "acknowledges them.", self.runtime.settings.flush_interval_seconds, buffered,
        )

    @override
    def config_problems(self) -> list[str]:
        return cross_field_problems(self.config)

    @override
    def prepare_config(
        self, config: dict[str, t.Any], properties: t.Mapping[str, t.Any]
    ) -> tuple[dict[str, t.Any], list[str], frozenset[str]]:
        check = check_config_keys(config, properties)
        return check.config, check.problems, check.settings

    @override
    def offer_state(self, state: dict) -> None:
        # drain_all calls this after queueing every sink's batch: hold it until acked.
        self.runtime.pipeline.offer_state(state)

    @override
    def before_schema(self) -> None:
        self.runtime.ensure_started()

    @override
    def raise_if_delivery_failed(self) -> None:
        pipeline = self.runtime.pipeline
        if pipeline.error is not None:
            pipeline.raise_if_failed()

    # -- public SDK hooks ------------------------------------------------------------------

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
    def process_endofpipe(self) -> None:
        super().process_endofpipe()
        self.runtime.pipeline.wait_all()
        # Every late event is in its backfill (or dead-lettered): close them now.
        self.runtime.finish_backfills(failed=False)
        self.runtime.prune_ledger()
        self.runtime.close()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        """Stop reading at once; never acknowledge a batch that is still in flight.

        A delivery failure (a delivery thread interrupts the reading thread) is re-raised;
        a real signal becomes TerminatedError. STATE already written covers only settled
        requests.
        """
        pipeline = self.runtime.pipeline
        if pipeline.error is not None:
            if pipeline.error_reported:
                return  # the reading thread already has the error; this is its echo
            pipeline.raise_if_failed()
        raise TerminatedError(signum)

    @classmethod
    @override
    def invoke(cls, **kwargs: t.Any) -> None:
        """Run the target from the CLI with clear errors and exit codes.

        The SDK's `invoke` builds the target (config validation; here also the ping) and
        calls `listen()`; this wraps it. Exit codes: 0 success; 1 a delivery, configuration
        or data error (message logged, no traceback); 128+N after signal N.

        Args:
            kwargs: The SDK's CLI arguments (`about`, `about_format`, `config`, `file_input`).
        """
        if kwargs.get("about"):
            super().invoke(**kwargs)
            return
        cls.is_cli_run = True
        cls.cli_target = None
        exit_code = 1  # stays 1 for an unexpected exception (a bug: its traceback is kept)
        message: str | None = None
        try:
            super().invoke(**kwargs)
            exit_code = 0
        except _EXPECTED_ERRORS as exc:
            message = str(exc)
        except DeliveryAbortedError:
            message = "delivery was aborted"
        except TerminatedError as exc:
            exit_code = 128 + int(exc.signum)
        except KeyboardInterrupt:
            exit_code = 128 + int(signal.SIGINT)
        except OSError as exc:
            message = f"I/O error: {exc}. Check `dead_letter_path` and disk space."
        finally:
            cls._finish(cls.cli_target, exit_code, message)

    @classmethod
    def _finish(cls, target: TargetOrb | None, exit_code: int, message: str | None) -> None:
        """The one end of a CLI run: report, close the runtime, log the summary, exit.

        A failed or interrupted run leaves with `os._exit`, so a delivery thread stuck in
        a request cannot hold the process; a success returns to the SDK's CLI.
        """
        cls._ignore_signals()
        pending = target.runtime.pipeline.unacknowledged if target is not None else 0
        if message is not None:
            cls.logger.error("target-orb failed: %s", message)
            if pending:
                cls.logger.error(
                    "%d events were in flight and are unacknowledged; no STATE covers them. "
                    "A rerun resends them under the same idempotency keys (Orb deduplicates).",
                    pending,
                )
        elif exit_code > 128:
            cls.logger.error(
                "Stopped by signal %d. %d events in flight were not acknowledged and no STATE "
                "covers them or anything after them; rerun to resend (same idempotency keys).",
                exit_code - 128, pending,
            )
        if target is not None:
            target.runtime.finish(
                failed=exit_code != 0,
                timeout=5.0 if exit_code == 0 else 1.0,
                # A signal means someone wants the process gone: less time for closing.
                backfill_budget=15.0 if exit_code > 128 else 60.0,
            )
        if exit_code != 0 and (message is not None or exit_code > 128):
            logging.shutdown()
            sys.stdout.flush()
            os._exit(exit_code)

    @staticmethod
    def _ignore_signals() -> None:
        """Once the run is ending, a late signal (or a delivery thread's interrupt) must not
        raise inside the shutdown path."""
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                signal.signal(signum, signal.SIG_IGN)
