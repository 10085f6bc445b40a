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
from target_orb.config_checks import check_config_keys
from target_orb.config_checks import config_problems as cross_field_problems
from target_orb.errors import (
    DeliveryAbortedError,
    OrbFatalError,
    OrbInvalidEventError,
    OrbRetryExhaustedError,
    StateWriteError,
    TerminatedError,
)
from target_orb.runtime import Runtime
from target_orb.settings import CONFIG_SCHEMA
from target_orb.singer.sdk_seam import SeamMessageReader, SeamTarget
from target_orb.sinks import OrbSink

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
        self.runtime = Runtime(
            self.config,
            logger=self.logger,
            state_writer=self.write_state_line,
            interrupt_main_on_failure=self.is_cli_run,
        )
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
