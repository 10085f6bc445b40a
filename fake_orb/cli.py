"""The ``fake-orb`` command: serve a stand-in Orb, or run a command against a fresh one
and print what landed."""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

from fake_orb.common import (
    _compact,
    parse_datetime,
    parse_when,
)
from fake_orb.core import FakeOrb
from fake_orb.ratelimit import RateLimit


def _summary(fake: FakeOrb) -> str:
    ingest = fake.ingest_requests()
    statuses = collections.Counter(
        "no-answer" if r["status"] is None else str(r["status"]) for r in ingest
    )
    events = fake.events()
    lines = [
        "=== fake-orb summary ===",
        f"ingest requests: {len(ingest)}",
        "responses: " + (", ".join(f"{s} x{n}" for s, n in sorted(statuses.items())) or "none"),
        f"events landed: {len(events)}",
        # Not "duplicates": target-orb's summary counts "duplicates collapsed" (copies inside
        # one request it never sent); these are keys that reached Orb again and were dropped.
        f"keys sent again (Orb kept the first copy): {fake.duplicates}",
    ]
    if fake.double_billed:
        lines.append(
            f"double billed (a key billed twice by a non-replacing backfill): {fake.double_billed}"
        )
    lines.extend(_compact(ev) for ev in events)
    lines.extend(_backfill_lines(fake))
    lines.extend(_correction_lines(fake))
    lines.extend(_invoice_lines(fake))
    lines.extend(_customer_lines(fake))
    return "\n".join(lines)


def _backfill_lines(fake: FakeOrb) -> list[str]:
    lines: list[str] = []
    backfills = fake.backfills()
    if backfills:
        lines.append(f"backfills: {len(backfills)}")
        lines.extend(
            f"  {bf['id']} {bf['status']} {bf['timeframe_start']}..{bf['timeframe_end']} "
            f"events={bf['events_ingested']} replace={str(bf['replace_existing_events']).lower()} "
            f"customer_id={bf['customer_id']} close_time={bf['close_time']}"
            for bf in backfills
        )
    return lines


def _correction_lines(fake: FakeOrb) -> list[str]:
    lines: list[str] = []
    corrections = fake.corrections()
    if corrections:
        lines.append(f"corrected events: {len(corrections)}")
        for c in corrections:
            state = f"deprecated ({c['deprecated']})" if c["deprecated"] else "amended"
            lines.append(
                f"  {c['id']}: {state}, {len(c['versions']) - 1} amendment(s); "
                f"current {_compact(c['versions'][-1])}"
            )
    return lines


def _invoice_lines(fake: FakeOrb) -> list[str]:
    lines: list[str] = []
    invoices = fake.invoices()
    if invoices:
        lines.append(f"invoices: {len(invoices)}")
        lines.extend(
            f"  {inv['id']} {inv['status']} {inv['customer']['external_customer_id']} "
            f"{inv['line_items'][0]['start_date']}..{inv['line_items'][0]['end_date']} "
            f"invoice_date={inv['invoice_date']}"
            for inv in invoices
        )
    issued = fake.issued_period_events()
    if issued:
        lines.append(
            f"events a backfill brought into an issued invoice's period (Orb does not "
            f"re-issue it): {len(issued)}"
        )
        lines.extend(
            f"  {e['idempotency_key']} ({e['external_customer_id']}, {e['timestamp']}) "
            f"backfill {e['backfill_id']} invoice {e['invoice_id']} {e['invoice_status']}"
            for e in issued
        )
    return lines


def _customer_lines(fake: FakeOrb) -> list[str]:
    lines: list[str] = []
    customers = fake.customers()
    if customers:
        lines.append(f"customers: {len(customers)} ({len(fake.customer_updates())} update(s))")
        lines.extend(
            f"  {c['external_customer_id']} ({c['id']}) metadata {_compact(c['metadata'])}"
            for c in customers
        )
    return lines


def _write_events(fake: FakeOrb, path: str, previous: str | None = None) -> str:
    """Replace `path` with the landed events (atomically, so a reader never sees half).

    Returns the text written; nothing is written when it equals `previous`.
    """
    text = "".join(_compact(ev) + "\n" for ev in fake.events())
    if text != previous:
        tmp = f"{path}.tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    return text


def _keep_events_file(fake: FakeOrb, path: str, stop: threading.Event) -> None:
    """Rewrite `--events-out` as events land, so it can be read while the stand-in runs."""
    written: str | None = None
    while not stop.wait(0.2):
        with contextlib.suppress(OSError):
            written = _write_events(fake, path, written)


def _write_overlay(fake: FakeOrb, path: str, grace_period_hours: float | None) -> None:
    """The config overlay: what points target-orb at this stand-in, as a second --config."""
    overlay: dict[str, Any] = {"api_url": fake.url, "api_key": fake.api_key}
    if grace_period_hours is not None:  # the stand-in's window, so both agree on "late"
        overlay["grace_period_hours"] = (
            int(grace_period_hours) if grace_period_hours == int(grace_period_hours)
            else grace_period_hours
        )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(overlay, fh, indent=2)
        fh.write("\n")
    print(
        f"fake-orb: wrote {path} (api_url, api_key"
        + (", grace_period_hours" if grace_period_hours is not None else "")
        + f"); run target-orb --config YOUR_CONFIG.json --config {path}",
        file=sys.stderr, flush=True,
    )


def _exit_code(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


@contextlib.contextmanager
def _signal_handlers(handler: Callable[[int, Any], None], *signums: int) -> Iterator[None]:
    previous: dict[int, Any] = {}
    try:
        for signum in signums:
            try:
                previous[signum] = signal.signal(signum, handler)
            except (ValueError, OSError):  # not the main thread / unsupported
                pass
        yield
    finally:
        for signum, old in previous.items():
            with contextlib.suppress(ValueError, OSError):
                signal.signal(signum, old)


def _run_command(fake: FakeOrb, cmd: list[str], max_seconds: float) -> int:
    env = dict(os.environ, TARGET_ORB_API_URL=fake.url, TARGET_ORB_API_KEY=fake.api_key)
    posix = os.name == "posix"
    try:
        # Own process group, so a timeout can take down the whole tree
        # (e.g. `meltano run` and its tap/target children).
        proc = subprocess.Popen(cmd, env=env, start_new_session=posix)
    except OSError as exc:
        print(f"fake-orb: cannot run {cmd[0]!r}: {exc}", file=sys.stderr)
        return 127

    def send(sig: int) -> None:
        with contextlib.suppress(OSError):
            if posix:
                os.killpg(proc.pid, sig)
            else:
                proc.send_signal(sig)

    def forward(signum: int, _frame: Any) -> None:
        send(signum)

    with _signal_handlers(forward, signal.SIGINT, signal.SIGTERM):
        try:
            return _exit_code(proc.wait(timeout=max_seconds))
        except subprocess.TimeoutExpired:
            print(
                f"fake-orb: command still running after --max-seconds {max_seconds:g}; killing it",
                file=sys.stderr,
            )
            send(signal.SIGTERM)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                send(signal.SIGKILL if posix else signal.SIGTERM)
                proc.kill()
                proc.wait()
            return 124


def _serve(fake: FakeOrb, max_seconds: float) -> int:
    print(fake.url, flush=True)
    print(
        f"fake-orb: serving Orb's ping, ingest, events/search, events/backfills, "
        f"customers, event amend/deprecate and invoices at {fake.url} "
        f"(api key {fake.api_key!r}); control API at {fake.root_url}/_fake/; "
        "Ctrl-C to stop",
        file=sys.stderr,
        flush=True,
    )
    done = threading.Event()

    def on_signal(_signum: int, _frame: Any) -> None:
        done.set()

    with _signal_handlers(on_signal, signal.SIGTERM):
        try:
            done.wait(max_seconds)
        except KeyboardInterrupt:
            pass
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fake-orb",
        description="A strict local stand-in for Orb's API: GET /v1/ping, POST /v1/ingest "
        "(with ?backfill_id=), POST /v1/events/search, /v1/events/backfills "
        "(create/list/fetch/close/revert), GET/PUT /v1/customers/external_customer_id/ID, "
        "PUT /v1/events/ID (amend), PUT /v1/events/ID/deprecate, GET /v1/invoices and "
        "GET /v1/invoices/ID, each validated against Orb's spec and documented rules "
        "(fake_orb/RULES.md); a request-level Idempotency-Key on POST/PATCH "
        "replays for 48 h. Control API (no key) under /_fake/: events, requests, stats, "
        "reset, script, bad_keys, 413_if_events_over, clock, customers, customer_updates, "
        "billing_period, backfills, corrections, invoices, issued_period_events, settings. "
        "Without COMMAND it serves until Ctrl-C/SIGTERM; "
        "with `-- COMMAND ...` it runs COMMAND with "
        "TARGET_ORB_API_URL and TARGET_ORB_API_KEY pointing at itself and exits with "
        "COMMAND's exit code.",
        usage="%(prog)s [options] [-- COMMAND ...]",
    )
    _add_rule_options(p)
    _add_rate_limit_options(p)
    _add_setup_options(p)
    return p


def _add_rule_options(p: argparse.ArgumentParser) -> None:
    """Where it listens, its key, Orb's grace period and backfill rules, validation."""
    p.add_argument("--host", default="127.0.0.1", help="loopback address to bind")
    p.add_argument("--port", type=int, default=0, help="port (0: pick a free one)")
    p.add_argument("--api-key", default="test-orb-key")
    p.add_argument(
        "--grace-period-hours", type=float, default=None, metavar="H",
        help="Orb's event reporting grace period (default 12): live ingest takes events "
        "from now - H on, and a backfill without deprecation_filter must end at or before "
        "now - H (the grace boundary); also written to --config-overlay",
    )
    p.add_argument(
        "--one-pending-backfill", action="store_true",
        help="refuse any backfill create while another backfill is pending or being "
        "reflected (Orb's support pages), not only an overlapping one of the same customer "
        "or an account-wide one (Orb's client docstring, the default)",
    )
    p.add_argument(
        "--reflection-delay-requests", type=int, default=0, metavar="N",
        help="a closed backfill stays pending for N more API requests before it is "
        "reflected (default 0: by the next request)",
    )
    p.add_argument("--future-tolerance-seconds", type=float, default=300)
    p.add_argument("--latency-ms", type=float, default=0, help="delay before each ingest answer")
    p.add_argument(
        "--accept-all",
        action="store_true",
        help="skip schema/prose validation (auth, JSON, dedup and counting still apply)",
    )


def _add_rate_limit_options(p: argparse.ArgumentParser) -> None:
    """Orb-style rate limits (all off unless given)."""
    p.add_argument(
        "--rate-limit-events", type=int, metavar="N",
        help="Orb-style fixed-window limit: at most N ingested events per window (429 "
        "without Retry-After beyond it)",
    )
    p.add_argument(
        "--rate-limit-window-seconds", type=float, default=60.0, metavar="S",
        help="window of --rate-limit-events (default 60, Orb's per-minute limit)",
    )
    p.add_argument(
        "--rate-limit-rps", type=int, metavar="N",
        help="at most N ingest requests per one-second window",
    )
    p.add_argument(
        "--rate-limit-writes-per-second", type=int, metavar="N",
        help="at most N write requests per one-second window: every POST/PUT/PATCH/DELETE "
        "but ingest (search, backfills, amend, deprecate, customer updates), as Orb counts "
        "them (live 50, test 5, trial 1); 429 without Retry-After beyond it",
    )
    p.add_argument(
        "--rate-limit-reads-per-second", type=int, metavar="N",
        help="at most N GET requests per one-second window (Orb: live 100, test 50, trial 10)",
    )


def _add_setup_options(p: argparse.ArgumentParser) -> None:
    """Seeded state, what it writes out, and how long it runs."""
    p.add_argument(
        "--invoice",
        metavar="EXT,START,END[,STATUS[,INVOICE_DATE]]",
        action="append",
        default=[],
        help="seed an invoice of customer EXT (created if unknown) for the service period "
        "START..END (RFC 3339 or YYYY-MM-DD), STATUS draft|issued|paid|synced|void (default "
        "issued), INVOICE_DATE default END (repeatable)",
    )
    p.add_argument(
        "--events-out", metavar="FILE",
        help="landed events as JSON lines, rewritten as they land (read it while the "
        "stand-in runs; also GET /_fake/events) and once more at exit",
    )
    p.add_argument(
        "--config-overlay", metavar="FILE",
        help="write a target-orb config overlay here ({api_url, api_key} of this stand-in, "
        "and grace_period_hours when --grace-period-hours is given) and remove it at exit; "
        "use your own config with it: target-orb --config mine.json --config FILE",
    )
    p.add_argument(
        "--now",
        metavar="ISO",
        help="freeze the stand-in's clock at this RFC 3339 time (e.g. 2030-01-31T12:00:00Z); "
        "move it later with POST /_fake/clock",
    )
    p.add_argument(
        "--customer",
        metavar="ID",
        action="append",
        default=[],
        help="seed a customer with this external_customer_id (repeatable); the customer "
        "endpoints, customer-scoped backfills, amend and deprecate need one",
    )
    p.add_argument(
        "--amend-cap",
        type=int,
        default=100,
        help="events amended or deprecated per customer per 100 days (Orb's default 100)",
    )
    p.add_argument(
        "--max-seconds",
        type=float,
        default=3600,
        help="serve at most this long / kill COMMAND after this long (exit 124)",
    )

def _rate_limit(args: argparse.Namespace) -> RateLimit | None:
    """The ``--rate-limit-*`` flags as a :class:`RateLimit` (None: none given)."""
    return (
        RateLimit(
            events_per_window=args.rate_limit_events or None,
            window_seconds=args.rate_limit_window_seconds,
            requests_per_second=args.rate_limit_rps or None,
            writes_per_second=args.rate_limit_writes_per_second,
            reads_per_second=args.rate_limit_reads_per_second,
        )
        if any(
            v is not None
            for v in (
                args.rate_limit_events or None,
                args.rate_limit_rps or None,
                args.rate_limit_writes_per_second,
                args.rate_limit_reads_per_second,
            )
        )
        else None
    )


def _build(args: argparse.Namespace) -> FakeOrb:
    """The stand-in the flags describe, clock set and customers and invoices seeded
    (raises ValueError or OSError)."""
    fake = FakeOrb(
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        grace_period_hours=12 if args.grace_period_hours is None else args.grace_period_hours,
        future_tolerance_seconds=args.future_tolerance_seconds,
        latency_ms=args.latency_ms,
        accept_all=args.accept_all,
        amend_cap=args.amend_cap,
        rate_limit=_rate_limit(args),
        one_pending_backfill=args.one_pending_backfill,
        reflection_delay_requests=args.reflection_delay_requests,
    )
    if args.now:
        fake.set_now(parse_datetime(args.now))
    for ext in args.customer:
        fake.add_customer(ext)
    for spec in args.invoice:
        parts = spec.split(",")
        if not 3 <= len(parts) <= 5:
            raise ValueError(
                f"--invoice {spec!r}: expected EXT,START,END[,STATUS[,INVOICE_DATE]]"
            )
        fake.add_invoice(
            parts[0],
            parse_when(parts[1]),
            parse_when(parts[2]),
            parts[3] if len(parts) > 3 and parts[3] else "issued",
            parse_when(parts[4]) if len(parts) > 4 and parts[4] else None,
        )
    return fake


def _keep_events_out(
    fake: FakeOrb, path: str | None, stop: threading.Event
) -> threading.Thread | None:
    """With ``--events-out``, the thread that keeps the file current (until ``stop``)."""
    if not path:
        return None
    keeper = threading.Thread(
        target=_keep_events_file, args=(fake, path, stop),
        name="fake-orb-events-out", daemon=True,
    )
    keeper.start()
    return keeper


def _stop(fake: FakeOrb, args: argparse.Namespace, stop: threading.Event,
          keeper: threading.Thread | None) -> None:
    stop.set()
    if keeper is not None:
        keeper.join(timeout=5)
    fake.stop()
    if args.config_overlay:
        with contextlib.suppress(OSError):
            os.remove(args.config_overlay)


def main(argv: list[str] | None = None) -> int:
    args_in = list(sys.argv[1:] if argv is None else argv)
    if "--" in args_in:
        cut = args_in.index("--")
        opts, cmd = args_in[:cut], args_in[cut + 1 :]
    else:
        opts, cmd = args_in, []
    parser = _parser()
    args = parser.parse_args(opts)
    if "--" in args_in and not cmd:
        parser.error("no COMMAND after --")
    if args.max_seconds <= 0:
        parser.error("--max-seconds must be positive")
    try:
        fake = _build(args)
    except (ValueError, OSError) as exc:
        parser.error(str(exc))
    fake.start()
    stop = threading.Event()
    keeper: threading.Thread | None = None
    try:
        if args.config_overlay:
            try:
                _write_overlay(fake, args.config_overlay, args.grace_period_hours)
            except OSError as exc:
                print(f"fake-orb: cannot write --config-overlay: {exc}", file=sys.stderr)
                return 2
        keeper = _keep_events_out(fake, args.events_out, stop)
        if cmd:
            print(f"fake-orb: {fake.url} -> {' '.join(cmd)}", file=sys.stderr, flush=True)
            rc = _run_command(fake, cmd, args.max_seconds)
        else:
            rc = _serve(fake, args.max_seconds)
    finally:
        _stop(fake, args, stop, keeper)
    if args.events_out:
        _write_events(fake, args.events_out)
    print(_summary(fake), flush=True)
    return rc
