"""What all sinks share for one run: settings, counters, the client, the pipeline, the features.

Built once by `TargetOrb` (the sinks reach it as `target.runtime`); each feature is built by
its own small function below, from what was built before it.
"""

from __future__ import annotations

import logging
import threading
import typing as t

from target_orb import jsonutil
from target_orb.backfill.manager import BackfillManager
from target_orb.backfill.ownership import (
    OwnershipRecord,
    StoreOwnershipRecord,
    record_path_for,
)
from target_orb.corrections.port import LiveOrbPort
from target_orb.corrections.upsert import Upserter
from target_orb.errors import OrbFatalError
from target_orb.identify.customers import CustomerUpdater
from target_orb.mapping.spec import build_mapping_spec
from target_orb.mapping.track import backfill_threshold
from target_orb.mapping.traits import build_identify_spec
from target_orb.orb.client import OrbClient
from target_orb.orb.delivery import Deliverer
from target_orb.orb.ratelimit import RateLimiter
from target_orb.pipeline.deadletter import DeadLetterWriter, entry_digest
from target_orb.pipeline.gate import Pipeline
from target_orb.pipeline.stats import RunStats
from target_orb.settings import (
    build_delivery_settings,
    job_name,
    load_method,
    state_url,
    state_url_setting,
)
from target_orb.state.backfills import BackfillRows
from target_orb.state.deadletters import DeadLetterStore
from target_orb.state.ledger import Ledger
from target_orb.state.ledger import default_url as ledger_default_url
from target_orb.state.ledger import describe as ledger_describe


class RuntimeHost(t.Protocol):
    """What a sink needs of its target: the shared runtime (`TargetOrb` is one)."""

    runtime: Runtime


class Runtime:
    """What all sinks share: the mapping spec, counters, the pipeline and the client."""

    def __init__(
        self,
        config: t.Mapping[str, t.Any],
        *,
        logger: logging.Logger,
        state_writer: t.Callable[[dict], None],
        interrupt_main_on_failure: bool,
    ) -> None:
        """Build everything a run shares, in dependency order.

        Args:
            config: The validated config.
            logger: The target's logger.
            state_writer: Writes one STATE line to stdout.
            interrupt_main_on_failure: A CLI run: a delivery failure interrupts the reader.
        """
        self.spec = build_mapping_spec(config)
        self.settings_config = config
        self.settings = build_delivery_settings(config)
        self.stats = RunStats()
        self.logger = logger
        self.job_name = job_name(config)
        self._started = False
        self._derived_warned = False
        self._summarized = False
        # One abort signal for the run: set on the first delivery failure and on close, it
        # ends every retry wait (ingest and other calls) at once.
        self.abort = threading.Event()
        # Orb budgets each kind of call separately (Orb's rate-limit page): ingest; writes,
        # which are every POST/PUT/PATCH/DELETE but ingest (search, backfill create/close,
        # customer updates, amend/deprecate); and reads (GET: backfill list/fetch, invoices).
        # Each paces itself to what Orb allows once Orb answers 429 (target_orb.orb.ratelimit).
        self.write_limiter = RateLimiter(name="writes", unit="requests")
        self.read_limiter = RateLimiter(name="reads", unit="requests")
        self.client: OrbClient | None = None
        self.ingest_limiter: RateLimiter | None = None
        # Retries for every Orb call (`deliverer.request` for calls other than ingest).
        self.deliverer: Deliverer | None = None
        if not self.settings.dry_run:
            self.client, self.ingest_limiter, self.deliverer = _build_ingest(self, config)
        # target-orb's own store (`state_url`): the corrections ledger under upsert, the keys
        # target-orb delivered and the backfills it created under `late_event_policy:
        # backfill`, the dead letters under `dead_letter_target: state`.
        self.ledger = _build_ledger(self, config)
        self.dead_letters = _build_dead_letters(self, config)
        self.pipeline = _build_pipeline(self, state_writer, interrupt_main_on_failure)
        self.backfills = _build_backfills(self, config)
        # `load_method: upsert` (README "Corrections"); None keeps append-only untouched.
        self.corrections = _build_corrections(self, config)
        # Identify → customer metadata; None under `identify_policy: skip` (nothing changes).
        self.identify = build_identify_spec(config, self.spec)
        self.customers = _build_customers(self)

    def backfill_ingest_deliverer(self, send: t.Callable[[bytes, int], t.Any]) -> Deliverer:
        """Ingest into one backfill: ingest's retry rules, budget and rate limits."""
        assert self.client is not None
        return Deliverer(
            send,
            url=f"{self.client.ingest_url}?backfill_id=…",
            max_retry_seconds=self.settings.max_retry_seconds,
            abort=self.abort,
            limiter=self.ingest_limiter,
            on_retry=self.stats.add_retry,
            on_sent=self.stats.add_sent,
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
        self.logger.info("target-orb job %r.", self.job_name)
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
                    "`state_url` at that store.", ledger_describe(self.ledger.url),
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
        text = f"target-orb job {self.job_name!r}: " + self.stats.summary(
            dead_letter_path=self.dead_letters.path,
            dry_run=self.settings.dry_run,
            failed=failed,
        )
        metrics = {"job_name": self.job_name, **self.stats.as_dict()}
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


# -- one builder per feature -----------------------------------------------------------------


def _build_ingest(
    runtime: Runtime, config: t.Mapping[str, t.Any]
) -> tuple[OrbClient, RateLimiter, Deliverer]:
    """The HTTP client, ingest's rate limiter and the deliverer (never in a dry run)."""
    s = runtime.settings
    client = OrbClient(
        s.api_url, config["api_key"], timeout=s.request_timeout,
        pool_size=s.max_concurrent_requests,
    )
    limiter = RateLimiter(
        requests_per_second=s.max_requests_per_second,
        events_per_minute=s.max_events_per_minute,
        name="ingest",
        unit="events",
    )
    deliverer = Deliverer(
        client.post_ingest,
        url=client.ingest_url,
        max_retry_seconds=s.max_retry_seconds,
        abort=runtime.abort,
        limiter=limiter,
        on_retry=runtime.stats.add_retry,
        on_sent=runtime.stats.add_sent,
    )
    return client, limiter, deliverer


def _build_pipeline(
    runtime: Runtime, state_writer: t.Callable[[dict], None], interrupt_main: bool
) -> Pipeline:
    """The STATE gate and its delivery threads."""
    s = runtime.settings
    return Pipeline(
        deliverer=runtime.deliverer,
        dead_letters=runtime.dead_letters,
        stats=runtime.stats,
        invalid_policy=s.invalid_event_policy,
        max_in_flight=s.max_concurrent_requests,
        state_writer=state_writer,
        abort=runtime.abort,
        dry_run=s.dry_run,
        ingest_url=f"{s.api_url}/ingest",
        interrupt_main_on_failure=interrupt_main,
        progress_interval=s.progress_interval_seconds,
    )


def _build_ledger(runtime: Runtime, config: t.Mapping[str, t.Any]) -> Ledger | None:
    """The store at `state_url`, when corrections, backfills or dead letters need it (never
    in a dry run)."""
    if runtime.client is not None and (
        load_method(config) == "upsert" or runtime.spec.late_event_policy == "backfill"
        or config.get("dead_letter_target") == "state"
    ):
        url = state_url(config, ledger_default_url(runtime.settings.dead_letter_path))
        return Ledger(url, setting=state_url_setting(config))
    return None


def _build_dead_letters(
    runtime: Runtime, config: t.Mapping[str, t.Any]
) -> DeadLetterWriter | DeadLetterStore:
    """The dead-letter file (`dead_letter_target: file`), or the store's table (`state`)."""
    if config.get("dead_letter_target") == "state":
        return DeadLetterStore(runtime.ledger, job_name=runtime.job_name, digest=entry_digest)
    return DeadLetterWriter(runtime.settings.dead_letter_path)


def _ownership(runtime: Runtime) -> OwnershipRecord | StoreOwnershipRecord:
    """The backfill ownership record: in the store (a dry run, which has none, gets the
    file's, never read)."""
    s = runtime.settings
    legacy = record_path_for(s.dead_letter_path)
    if runtime.ledger is None:
        return OwnershipRecord(legacy, s.api_url)
    return StoreOwnershipRecord(
        BackfillRows(runtime.ledger), api_url=s.api_url, job_name=runtime.job_name,
        legacy_path=legacy,
    )


def _build_backfills(
    runtime: Runtime, config: t.Mapping[str, t.Any]
) -> BackfillManager | None:
    """`late_event_policy: backfill`: late events go to Orb through backfills."""
    if runtime.spec.late_event_policy != "backfill":
        return None
    s = runtime.settings
    return BackfillManager(
        client=runtime.client,
        deliverer=runtime.deliverer,
        make_ingest_deliverer=runtime.backfill_ingest_deliverer if runtime.client else None,
        stats=runtime.stats,
        record=_ownership(runtime),
        write_limiter=runtime.write_limiter,
        read_limiter=runtime.read_limiter,
        grace_period_hours=runtime.spec.grace_period_hours,
        max_retry_seconds=s.max_retry_seconds,
        ledger=runtime.ledger,
        issued_policy=str(config.get("issued_period_policy") or "backfill"),
        aborted=runtime.abort.is_set,
        # Every wait (settling, holding past the boundary) wakes when the run aborts.
        sleep=runtime.abort.wait,
    )


def _build_corrections(runtime: Runtime, config: t.Mapping[str, t.Any]) -> Upserter | None:
    """`load_method: upsert`: the corrections feature over the ledger."""
    client, deliverer, ledger = runtime.client, runtime.deliverer, runtime.ledger
    if load_method(config) != "upsert" or ledger is None or client is None or deliverer is None:
        return None
    spec = runtime.spec
    pipeline = runtime.pipeline
    backfills = runtime.backfills
    return Upserter(
        spec=spec,
        ledger=ledger,
        port=LiveOrbPort(client, deliverer, write_limiter=runtime.write_limiter),
        pipeline=pipeline,
        deprecate_deleted_events=bool(config.get("deprecate_deleted_events")),
        aborted=runtime.abort.is_set,
        note_derived_key=runtime.note_derived_key,
        late_threshold=(
            (lambda now: backfill_threshold(now, spec.grace_period_hours))
            if spec.late_event_policy == "backfill" else None
        ),
        backfill_load=(
            (lambda stream, events, records: backfills.load_job(stream, events, records)())
            if backfills is not None else None
        ),
    )


def _build_customers(runtime: Runtime) -> CustomerUpdater:
    """Identify → customer metadata updates (idle unless `identify_policy` asks for them)."""
    return CustomerUpdater(
        client=runtime.client,
        deliverer=runtime.deliverer,
        pipeline=runtime.pipeline,
        limiter=runtime.write_limiter,
        stats=runtime.stats,
        api_url=runtime.settings.api_url,
    )
