"""`target-orb-deadletter`: turn a dead-letter file back into a Singer stream to resend it."""

from __future__ import annotations

import typing as t

from target_orb import jsonutil


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


def main(argv: t.Sequence[str] | None = None) -> int:
    """`target-orb-deadletter replay FILE` (or `python -m target_orb.deadletter …`).

    Prints a Singer stream that re-sends every dead-lettered record.

    Args:
        argv: Command-line arguments.

    Returns:
        Exit code.
    """
    import argparse  # noqa: PLC0415
    import sys  # noqa: PLC0415

    parser = argparse.ArgumentParser(
        prog="target-orb-deadletter",
        description="Turn a target-orb dead-letter file back into Singer messages, e.g. "
        "`target-orb-deadletter replay dl.jsonl > resend.singer`, then, once the cause is "
        "fixed, `target-orb --config config.json --input resend.singer` (records keep their "
        "idempotency keys). Also runs as `python -m target_orb.deadletter`.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    replay = sub.add_parser("replay", help="write SCHEMA/RECORD lines for every entry to stdout")
    replay.add_argument("path", help="dead-letter file (JSON Lines)")
    args = parser.parse_args(argv)
    try:
        with open(args.path, encoding="utf-8") as handle:
            for out in replay_lines(handle):
                sys.stdout.write(out + "\n")
    except (OSError, ValueError) as exc:
        sys.stderr.write(
            f"target-orb-deadletter: cannot replay {args.path}: {exc}. Pass the file named by "
            "`dead_letter_path` (JSON Lines written by target-orb), unchanged.\n"
        )
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
