"""`target-orb-deadletter`: list, export and replay dead letters, from the file or the store.

`replay FILE` turns a dead-letter file back into a Singer stream to resend it. With
`--state-url URL` (the store of `dead_letter_target: state`): `list` shows them, `export`
writes every one as JSON Lines (the file's fields, oldest first), `replay` writes a Singer
stream of those not replayed yet and marks them replayed, so a second replay sends nothing
new.
"""

from __future__ import annotations

import sys
import typing as t

from sqlalchemy.exc import SQLAlchemyError

from target_orb import jsonutil
from target_orb.errors import OrbFatalError
from target_orb.state import deadletters
from target_orb.state.ledger import Ledger, describe


def replay_lines(lines: t.Iterable[str]) -> t.Iterator[str]:
    """Turn dead-letter lines back into a Singer stream (SCHEMA + RECORD per stream).

    The records are written exactly as they were received, so a record whose key came
    from `idempotency_key_field` is re-sent under the same idempotency key.

    Args:
        lines: Lines of a dead-letter file.

    Yields:
        Singer message lines (without newline).
    """
    seen_streams: set[str] = set()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            item = jsonutil.loads(line)
        except ValueError as exc:
            msg = f"line {number} is not JSON: {exc}"
            raise ValueError(msg) from None
        if not isinstance(item, dict) or "stream" not in item or "record" not in item:
            msg = f"line {number} is not a target-orb dead-letter entry (no stream/record)"
            raise ValueError(msg)
        stream = item["stream"]
        if stream not in seen_streams:
            seen_streams.add(stream)
            schema = {"type": "object", "properties": {}, "additionalProperties": True}
            yield jsonutil.dumps_str(
                {"type": "SCHEMA", "stream": stream, "schema": schema, "key_properties": []},
            )
        yield jsonutil.dumps_lenient({"type": "RECORD", "stream": stream, "record": item["record"]})


def _parser() -> t.Any:
    import argparse  # noqa: PLC0415

    parser = argparse.ArgumentParser(
        prog="target-orb-deadletter",
        description="List, export and replay target-orb's dead letters, from the file at "
        "`dead_letter_path` or from the store at `--state-url URL` (dead_letter_target: "
        "state). E.g. `target-orb-deadletter replay dl.jsonl > resend.singer`, then, once the "
        "cause is fixed, `target-orb --config config.json --input resend.singer` (records keep "
        "their idempotency keys). From the store, `replay` marks what it replayed, so a second "
        "replay sends nothing new. Also runs as `python -m target_orb.deadletter`.",
    )
    # Accepted before or after the command (`--state-url URL export`, `export --state-url URL`).
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--state-url", metavar="URL", default=argparse.SUPPRESS,
                        help="target-orb's store (the `state_url` setting) instead of a file")
    common.add_argument("--job", default=argparse.SUPPRESS,
                        help="with --state-url: only this job's dead letters")
    parser.add_argument("--state-url", metavar="URL", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--job", default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)
    helps = {
        "replay": "write SCHEMA/RECORD lines to stdout (from the store: those not replayed yet, "
                  "then mark them replayed)",
        "list": "one line per dead letter (tab-separated)",
        "export": "every dead letter as JSON Lines, oldest first (the file's fields)",
    }
    for name, text in helps.items():
        command = sub.add_parser(name, help=text, parents=[common])
        command.add_argument("path", nargs="?", help="dead-letter file (JSON Lines)")
    return parser


def main(argv: t.Sequence[str] | None = None) -> int:
    """`target-orb-deadletter replay|list|export (FILE | --state-url URL)`.

    Args:
        argv: Command-line arguments.

    Returns:
        Exit code.
    """
    parser = _parser()
    args = parser.parse_args(argv)
    if args.state_url and args.path:
        parser.error("give either --state-url URL or a FILE, not both")
    if args.state_url:
        return _from_store(args.state_url, args.command, args.job)
    if not args.path:
        parser.error("name the dead-letter FILE, or the store with --state-url URL")
    try:
        with open(args.path, encoding="utf-8") as handle:
            _from_file(handle, args.command)
    except (OSError, ValueError) as exc:
        sys.stderr.write(
            f"target-orb-deadletter: cannot {args.command} {args.path}: {exc}. Pass the file "
            "named by `dead_letter_path` (JSON Lines written by target-orb), unchanged.\n"
        )
        return 1
    return 0


def _from_file(lines: t.Iterable[str], command: str) -> None:
    """`replay`, `list` or `export` the entries of a dead-letter file."""
    if command == "replay":
        for out in replay_lines(lines):
            sys.stdout.write(out + "\n")
        return
    count = 0
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        item = jsonutil.loads(line)
        if not isinstance(item, dict) or "stream" not in item or "record" not in item:
            msg = f"line {number} is not a target-orb dead-letter entry (no stream/record)"
            raise ValueError(msg)
        count += 1
        if command == "export":
            sys.stdout.write(jsonutil.dumps_lenient(item) + "\n")
        else:
            sys.stdout.write(f"{number}\t{item['stream']}\t{item.get('source')}\t"
                             f"{item.get('reason')}\n")
    if command == "list":
        sys.stderr.write(f"{count} dead letter(s).\n")


def _from_store(url: str, command: str, job: str | None) -> int:
    """`list`, `export` or `replay` the dead letters in the store at `url`."""
    store = Ledger(url, setting="--state-url")
    try:
        store.open()
        if command == "export":
            for _, item, _meta in deadletters.stored_entries(store, job_name=job):
                sys.stdout.write(jsonutil.dumps_lenient(item) + "\n")
        elif command == "list":
            _list(store, job)
        else:
            _replay(store, job)
        sys.stdout.flush()
    except OrbFatalError as exc:
        sys.stderr.write(f"target-orb-deadletter: {exc}\n")
        return 1
    except SQLAlchemyError as exc:
        detail = str(getattr(exc, "orig", None) or exc).splitlines()[0][:200]
        sys.stderr.write(
            f"target-orb-deadletter: cannot read the store at `--state-url` {describe(url)}: "
            f"{detail}\n"
        )
        return 1
    finally:
        store.close()
    return 0


def _list(store: Ledger, job: str | None) -> None:
    count = waiting = 0
    for row_id, item, meta in deadletters.stored_entries(store, job_name=job):
        count += 1
        waiting += meta["replayed_at"] is None
        replayed = f"replayed {meta['replayed_at']}" if meta["replayed_at"] else "not replayed"
        sys.stdout.write(
            f"{row_id}\t{meta['created_at']}\t{meta['job_name']}\t{item['stream']}\t"
            f"{item['source']}\t{replayed}\t{item['reason']}\n"
        )
    sys.stderr.write(f"{count} dead letter(s), {waiting} not replayed yet.\n")


def _replay(store: Ledger, job: str | None) -> None:
    """Write the unreplayed entries as a Singer stream; mark them once stdout has them."""
    rows = list(deadletters.stored_entries(store, unreplayed_only=True, job_name=job))
    lines = replay_lines(jsonutil.dumps_lenient(item) for _, item, _ in rows)
    for out in lines:
        sys.stdout.write(out + "\n")
    sys.stdout.flush()
    deadletters.mark_replayed(store, [row_id for row_id, _, _ in rows])
    sys.stderr.write(
        f"Replayed {len(rows)} dead letter(s) (marked replayed: the next replay skips them "
        "unless target-orb dead-letters them again).\n"
    )


if __name__ == "__main__":
    raise SystemExit(main())
