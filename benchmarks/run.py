"""target-orb throughput and memory benchmark. One command::

    .venv/bin/python benchmarks/run.py            # the issue's scenarios (~10-15 min on 2 cores)
    .venv/bin/python benchmarks/run.py --quick    # small smoke run (~1 min)

Scenarios (see benchmarks/README.md):

- S1: N records (default 200,000), stand-in at 0 ms. target-orb vs ``NoopTarget`` (a
  singer-sdk target whose BatchSink does nothing, SDK defaults), interleaved.
- S2: N/4 records (default 50,000), stand-in adding 50 ms per request. target-orb at
  ``max_concurrent_requests`` 4/8/16 vs ``SyncHttpTarget`` (SDK defaults, ``requests``,
  one batch of 500 per round trip), interleaved.
- S3: target-orb peak RSS at 100,000 vs 1,000,000 records (stand-in at 0 ms).

Every target runs as its own process reading the generated file through ``--input``;
wall time is measured from spawn to exit (start-up included) and peak RSS comes from
``os.wait4``'s rusage for that one child. The stand-in Orb (``standin.py``) runs in
another process; after every run the benchmark checks it received exactly the N
generated keys, none twice and none with two different bodies.

The Markdown report is printed and written to ``benchmarks/results/latest.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import platform
import pstats
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from backfill_case import report_backfill, scenario_backfill  # noqa: E402
from generate import generate  # noqa: E402

PY = sys.executable
# The installed console script (falls back to `python -m target_orb`).
_SCRIPT = Path(PY).parent / "target-orb"
TARGET_ORB = [str(_SCRIPT)] if _SCRIPT.exists() else [PY, "-m", "target_orb"]
BASELINES = [PY, str(HERE / "baselines.py")]
RESULTS = HERE / "results"

# Targets from the issue (2-core machine).
S1_TARGET_RATIO = 6.0
S2_TARGET_RATIO = 8.0
RSS_FLAT_PCT = 10.0
RSS_MAX_MB = 200.0

# The settings benchmarks/README.md recommends for volume ("volume config"): batch_size_rows
# 500, max_concurrent_requests --concurrency, and validate_records false (target-orb's
# default: its own mapping checks every field it sends). Every scenario also runs target-orb
# with validate_records true, reported as its own row.
VOLUME_VALIDATE = False


# --------------------------------------------------------------------------- helpers


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def machine() -> dict[str, str]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = "unknown"
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    try:
        sdk = importlib.metadata.version("singer-sdk")
    except importlib.metadata.PackageNotFoundError:
        sdk = "?"
    try:
        commit = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, timeout=10, check=False,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = "?"
    dirty = "?"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        dirty = "dirty" if subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--", "target_orb"],
            capture_output=True, text=True, timeout=10, check=False,
        ).stdout.strip() else "clean"
    return {
        "target_orb_tree": dirty,
        "loadavg": loadavg(),
        "nproc": str(os.cpu_count()),
        "cpu": cpu,
        "ram": mem,
        "python": platform.python_version(),
        "singer-sdk": sdk,
        "platform": platform.platform(),
        "commit": commit,
    }


class StandIn:
    """``standin.py`` in its own process, driven over stdin/stdout."""

    def __init__(self, latency_ms: float, max_seconds: float) -> None:
        self.latency_ms = latency_ms
        self.proc = subprocess.Popen(
            [PY, str(HERE / "standin.py"), "--latency-ms", str(latency_ms),
             "--max-seconds", str(int(max_seconds))],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=str(ROOT),
            start_new_session=True,
        )
        hello = self._read(30)
        self.url: str = hello["url"]

    def _read(self, timeout: float) -> dict[str, Any]:
        box: list[str] = []
        reader = threading.Thread(target=lambda: box.append(self.proc.stdout.readline()))
        reader.daemon = True
        reader.start()
        reader.join(timeout)
        if not box or not box[0]:
            raise RuntimeError("the stand-in did not answer")
        return json.loads(box[0])

    def command(self, cmd: str, timeout: float = 120) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"cmd": cmd}) + "\n")
        self.proc.stdin.flush()
        return self._read(timeout)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.command("stop", timeout=10)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(OSError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def __enter__(self) -> StandIn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class Run:
    label: str
    records: int
    seconds: float
    rss_mb: float
    rc: int
    cpu_s: float = 0.0
    checks: dict[str, Any] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.records / self.seconds if self.seconds > 0 else 0.0

    @property
    def exact(self) -> bool | None:
        return self.checks.get("exact")


@dataclass
class Child:
    seconds: float
    rss_mb: float
    cpu_s: float
    rc: int
    stdout: Path


def run_child(cmd: list[str], *, timeout: float, workdir: Path, name: str) -> Child:
    """Run one target process: wall seconds, peak RSS, CPU seconds (user+sys), exit code."""
    out_path = workdir / f"{name}.stdout"
    err_path = workdir / f"{name}.stderr"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TARGET_")}
    env["PYTHONUNBUFFERED"] = "0"
    with out_path.open("wb") as out, err_path.open("wb") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err, cwd=str(workdir), env=env,
            start_new_session=True,
        )
        timed_out = threading.Event()

        def kill() -> None:
            timed_out.set()
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, signal.SIGKILL)

        timer = threading.Timer(timeout, kill)
        timer.daemon = True
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
        seconds = time.perf_counter() - start
    rc = os.waitstatus_to_exitcode(status)
    proc.returncode = rc  # already reaped by wait4
    if timed_out.is_set():
        log(f"{name}: killed after {timeout:.0f} s")
    if rc != 0:
        tail = err_path.read_text(errors="replace")[-2000:]
        log(f"{name}: exit code {rc}; stderr tail:\n{tail}")
    return Child(seconds, usage.ru_maxrss / 1024.0, usage.ru_utime + usage.ru_stime, rc,
                 out_path)


def last_emitted_state(path: Path) -> Any:
    """The last STATE value a target wrote (targets write the bare value, one per line)."""
    last = None
    with path.open("rb") as fh:
        for line in fh:
            if line.strip():
                last = line
    return json.loads(last) if last else None


def last_state(path: Path) -> Any:
    """The value of the last STATE message in a Singer input file."""
    last = None
    with path.open("rb") as fh:
        for line in fh:
            if line.startswith(b'{"type":"STATE"') or line.startswith(b'{"type": "STATE"'):
                last = line
    return json.loads(last)["value"] if last else None


def check_landing(standin: StandIn, meta: dict[str, Any], out_path: Path,
                  expected_state: Any) -> dict[str, Any]:
    summary = standin.command("summary")
    state = last_emitted_state(out_path)
    summary["final_state_ok"] = state == expected_state
    summary["exact"] = (
        summary["landed"] == meta["records"]
        and summary["keys_sha256"] == meta["keys_sha256"]
        and summary["duplicates"] == 0
        and summary["conflicting_keys"] == 0
    )
    return summary


def orb_config(url: str, workdir: Path, name: str, *, concurrency: int, validate: bool) -> Path:
    config = {
        "api_key": "test-orb-key",
        "api_url": url,
        "external_customer_id_field": "userId",
        "properties_passthrough": True,
        "batch_size_rows": 500,
        "max_concurrent_requests": concurrency,
        "progress_interval_seconds": 0,
        "dead_letter_path": str(workdir / f"{name}.dead-letter.jsonl"),
        "validate_records": validate,
    }
    path = workdir / f"{name}.config.json"
    path.write_text(json.dumps(config, indent=2))
    return path


def timeout_for(records: int, slow_rate: float = 1000.0) -> float:
    return 120.0 + records / slow_rate


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.n = 0

    def name(self, label: str) -> str:
        self.n += 1
        return f"{self.n:03d}-{label.replace(' ', '_').replace('=', '')}"

    def expected_state(self, input_path: Path) -> Any:
        return last_state(input_path)

    def run_orb(self, standin: StandIn, meta: dict[str, Any], input_path: Path, label: str,
                *, concurrency: int, validate: bool, expected_state: Any) -> Run:
        name = self.name(label)
        cpu0 = standin.command("reset")["cpu_seconds"]
        cfg = orb_config(standin.url, self.workdir, name, concurrency=concurrency,
                         validate=validate)
        cmd = [*TARGET_ORB, "--config", str(cfg), "--input", str(input_path)]
        child = run_child(cmd, timeout=timeout_for(meta["records"]), workdir=self.workdir,
                          name=name)
        checks = check_landing(standin, meta, child.stdout, expected_state)
        checks["standin_cpu_s"] = checks["cpu_seconds"] - cpu0
        dl = Path(str(self.workdir / f"{name}.dead-letter.jsonl"))
        checks["dead_letters"] = sum(1 for _ in dl.open()) if dl.exists() else 0
        if checks["dead_letters"]:
            checks["exact"] = False
        run = Run(label, meta["records"], child.seconds, child.rss_mb, child.rc, child.cpu_s,
                  checks)
        log(f"{label}: {run.rate:,.0f} rec/s, {run.seconds:.2f} s, CPU {run.cpu_s:.2f} s, "
            f"stand-in CPU {checks['standin_cpu_s']:.2f} s, {run.rss_mb:.0f} MB, landed "
            f"{checks['landed']:,}/{meta['records']:,}, exact={run.exact}, rc={run.rc}")
        return run

    def run_noop(self, meta: dict[str, Any], input_path: Path) -> Run:
        name = self.name("noop")
        cmd = [*BASELINES, "noop", "--input", str(input_path)]
        child = run_child(cmd, timeout=timeout_for(meta["records"], 500),
                          workdir=self.workdir, name=name)
        run = Run("noop", meta["records"], child.seconds, child.rss_mb, child.rc, child.cpu_s)
        log(f"noop: {run.rate:,.0f} rec/s, {run.seconds:.2f} s, CPU {run.cpu_s:.2f} s, "
            f"{run.rss_mb:.0f} MB, rc={run.rc}")
        return run

    def run_sync(self, standin: StandIn, meta: dict[str, Any], input_path: Path,
                 expected_state: Any) -> Run:
        name = self.name("sync-http")
        cpu0 = standin.command("reset")["cpu_seconds"]
        cfg = self.workdir / f"{name}.config.json"
        cfg.write_text(json.dumps({"api_key": "test-orb-key", "api_url": standin.url}))
        cmd = [*BASELINES, "sync-http", "--config", str(cfg), "--input", str(input_path)]
        child = run_child(cmd, timeout=timeout_for(meta["records"], 200),
                          workdir=self.workdir, name=name)
        checks = check_landing(standin, meta, child.stdout, expected_state)
        checks["standin_cpu_s"] = checks["cpu_seconds"] - cpu0
        run = Run("sync-http", meta["records"], child.seconds, child.rss_mb, child.rc,
                  child.cpu_s, checks)
        log(f"sync-http: {run.rate:,.0f} rec/s, {run.seconds:.2f} s, CPU {run.cpu_s:.2f} s, "
            f"{run.rss_mb:.0f} MB, landed {checks['landed']:,}, exact={run.exact}, rc={run.rc}")
        return run

    def startup(self, standin: StandIn) -> dict[str, float]:
        """Seconds each target takes on a stream with no records (fixed start-up cost)."""
        meta = generate(self.workdir / "empty.singer", 0, states=1)
        path = Path(meta["path"])
        out: dict[str, float] = {}
        for _ in range(2):
            out.setdefault("target-orb", 1e9)
            r = self.run_orb(standin, meta, path, "startup", concurrency=4,
                             validate=VOLUME_VALIDATE,
                             expected_state=None)
            out["target-orb"] = min(out["target-orb"], r.seconds)
            r = self.run_noop(meta, path)
            out["noop"] = min(out.get("noop", 1e9), r.seconds)
        return out


def median_rate(runs: list[Run]) -> float:
    return statistics.median(r.rate for r in runs) if runs else 0.0


def median_rss(runs: list[Run]) -> float:
    return statistics.median(r.rss_mb for r in runs) if runs else 0.0


def all_exact(runs: list[Run]) -> bool:
    return all(r.exact and r.rc == 0 and r.checks.get("final_state_ok", True) for r in runs)


# --------------------------------------------------------------------------- scenarios


def scenario_s1(bench: Bench, n: int, rounds: int, concurrency: int) -> dict[str, Any]:
    """target-orb (volume config, and with validation on) vs the no-op target, interleaved."""
    log(f"S1: generating {n:,} records")
    meta = generate(bench.workdir / "s1.singer", n)
    path = Path(meta["path"])
    expected = last_state(path)
    runs: dict[str, list[Run]] = {"orb": [], "orb-validate": [], "noop": []}
    with StandIn(0, max_seconds=timeout_for(n) * rounds * 3 + 600) as standin:
        startup = bench.startup(standin)
        for r in range(rounds):
            order = ["orb", "noop", "orb-validate"]
            if r % 2:
                order.reverse()
            for kind in order:
                if kind == "noop":
                    runs["noop"].append(bench.run_noop(meta, path))
                else:
                    validate = kind == "orb-validate" or VOLUME_VALIDATE
                    runs[kind].append(bench.run_orb(
                        standin, meta, path, f"S1 {kind} c={concurrency}",
                        concurrency=concurrency, validate=validate, expected_state=expected))
    return {"meta": meta, "runs": runs, "startup": startup, "concurrency": concurrency}


def scenario_s2(bench: Bench, n: int, rounds: int, *, concurrencies: list[int],
                recommended: int, latency_ms: float) -> dict[str, Any]:
    """target-orb at each concurrency (volume config) and with validation on vs sync HTTP."""
    log(f"S2: generating {n:,} records (stand-in latency {latency_ms:g} ms)")
    meta = generate(bench.workdir / "s2.singer", n)
    path = Path(meta["path"])
    expected = last_state(path)
    kinds = ["sync", *[f"orb c={c}" for c in concurrencies], f"orb-validate c={recommended}"]
    runs: dict[str, list[Run]] = {k: [] for k in kinds}
    with StandIn(latency_ms, max_seconds=timeout_for(n, 200) * rounds * 8 + 600) as standin:
        for r in range(rounds):
            for kind in (kinds if r % 2 == 0 else kinds[::-1]):
                if kind == "sync":
                    runs[kind].append(bench.run_sync(standin, meta, path, expected))
                    continue
                c = int(kind.split("=")[1])
                validate = kind.startswith("orb-validate") or VOLUME_VALIDATE
                runs[kind].append(bench.run_orb(
                    standin, meta, path, f"S2 {kind}", concurrency=c, validate=validate,
                    expected_state=expected))
    return {"meta": meta, "runs": runs, "recommended": recommended, "latency_ms": latency_ms}


def scenario_s3(bench: Bench, sizes: list[int], rounds: int, concurrency: int) -> dict[str, Any]:
    """target-orb alone (volume config) at each size; one stand-in per size."""
    results: dict[int, list[Run]] = {}
    metas: dict[int, dict[str, Any]] = {}
    for n in sizes:
        log(f"S3: generating {n:,} records")
        meta = generate(bench.workdir / f"s3-{n}.singer", n)
        path = Path(meta["path"])
        expected = last_state(path)
        metas[n] = meta
        with StandIn(0, max_seconds=timeout_for(n) * rounds + 600) as standin:
            results[n] = [
                bench.run_orb(standin, meta, path, f"S3 orb {n}", concurrency=concurrency,
                              validate=VOLUME_VALIDATE, expected_state=expected)
                for _ in range(rounds)
            ]
        path.unlink()  # the 1M file is ~550 MB
        log(f"S3: deleted {path.name}")
    return {"runs": results, "metas": metas}


def profile(bench: Bench, n: int, concurrency: int, top: int = 15) -> str:
    """cProfile the target-orb process (main/reading thread) on n records at 0 ms."""
    meta = generate(bench.workdir / "profile.singer", n)
    path = Path(meta["path"])
    prof = bench.workdir / "target-orb.prof"
    with StandIn(0, max_seconds=timeout_for(n) + 300) as standin:
        cfg = orb_config(standin.url, bench.workdir, "profile", concurrency=concurrency,
                         validate=VOLUME_VALIDATE)
        cmd = [PY, "-m", "cProfile", "-o", str(prof), "-m", "target_orb",
               "--config", str(cfg), "--input", str(path)]
        child = run_child(cmd, timeout=timeout_for(n), workdir=bench.workdir, name="profile")
        secs, rc = child.seconds, child.rc
        summary = standin.command("summary")
    lines = [f"cProfile of target-orb on {n:,} records at 0 ms (volume config: c={concurrency}, "
             f"validate_records {str(VOLUME_VALIDATE).lower()}): {secs:.2f} s wall under the "
             f"profiler, rc={rc}, landed {summary['landed']:,}. "
             "Main (reading) thread only; the sender threads are not profiled.", ""]
    if not prof.exists():
        return "\n".join([*lines, "(no profile written)"])
    stats = pstats.Stats(str(prof))
    rows = []
    for (filename, lineno, func), (_cc, nc, tt, ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        for marker in ("target_orb/", "singer_sdk/"):
            if marker in filename:
                short = filename[filename.index(marker):]
                rows.append((ct, tt, nc, f"{short}:{lineno}({func})"))
    rows.sort(reverse=True)
    lines.append("| cumulative s | own s | calls | function |")
    lines.append("|---:|---:|---:|---|")
    for ct, tt, nc, where in rows[:top]:
        lines.append(f"| {ct:.2f} | {tt:.2f} | {nc:,} | `{where}` |")
    # Where the own time goes overall (any module), for context.
    own = sorted(
        ((tt, nc, f"{Path(fn).name}:{ln}({fu})")
         for (fn, ln, fu), (_cc, nc, tt, _ct, _c) in stats.stats.items()),  # type: ignore[attr-defined]
        reverse=True,
    )[:10]
    lines += ["", "Top 10 by own time (any module):", "", "| own s | calls | function |",
              "|---:|---:|---|"]
    lines += [f"| {tt:.2f} | {nc:,} | `{where}` |" for tt, nc, where in own]
    return "\n".join(lines)


# --------------------------------------------------------------------------- report


def fmt_rate(x: float) -> str:
    return f"{x:,.0f}"


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def report(args: argparse.Namespace, env: dict[str, str], *, s1: dict | None,
           s2: dict | None, s3: dict | None, prof: str | None, elapsed: float) -> str:
    out: list[str] = []
    out.append("# target-orb benchmark")
    out.append("")
    out.append(f"Machine: {env['nproc']} CPUs ({env['cpu']}), {env['ram']} RAM, Python "
               f"{env['python']}, singer-sdk {env['singer-sdk']}, {env['platform']}; "
               f"commit {env['commit']} (target_orb/ {env['target_orb_tree']} in the working "
               f"tree). Run took {elapsed / 60:.1f} min. Load average (1/5/15 min) at start "
               f"{env['loadavg']}, at end {loadavg()}: anything else running on the machine "
               "shows up as noise in the wall times (CPU seconds below are less sensitive).")
    out.append("")
    out.append("Wall time per process from spawn to exit (start-up, ping and final drain "
               "included); records/s = N / wall; medians of the interleaved rounds. Peak RSS "
               "is the child's `ru_maxrss` from `os.wait4`. The stand-in runs in a separate "
               "process, but on this machine it shares the CPUs with the target under test.")
    out.append("")
    out.append("| scenario | records | target-orb rec/s | baseline rec/s | ratio | target "
               "| target-orb peak RSS MB | keys landed == N |")
    out.append("|---|---:|---:|---:|---:|---|---:|---|")
    summary: list[str] = []

    vol = f"validate_records {str(VOLUME_VALIDATE).lower()}"
    val = f"validate_records {str(not VOLUME_VALIDATE).lower()}"

    def row(label: str, n: int, runs: list[Run], base: float, goal: float) -> float:
        rate = median_rate(runs)
        ratio = rate / base if base else 0.0
        out.append(
            f"| {label} | {n:,} | {fmt_rate(rate)} | {fmt_rate(base)} | {ratio:.2f}x | "
            f">= {goal:g}x: {verdict(ratio >= goal)} | {median_rss(runs):.0f} | "
            f"{'yes' if all_exact(runs) else 'NO'} ({len(runs)} runs) |")
        return ratio

    if s1:
        n = s1["meta"]["records"]
        base = median_rate(s1["runs"]["noop"])
        c = s1["concurrency"]
        ratio = row(f"S1 @0 ms: target-orb, volume config ({vol}, c={c}) vs no-op "
                    "SDK-default target", n, s1["runs"]["orb"], base, S1_TARGET_RATIO)
        summary.append(f"S1 ratio {ratio:.2f}x with the volume config (target >= "
                       f"{S1_TARGET_RATIO:g}x): {verdict(ratio >= S1_TARGET_RATIO)}")
        ratio = row(f"S1 @0 ms: target-orb, {val} (c={c}) vs no-op SDK-default target", n,
                    s1["runs"]["orb-validate"], base, S1_TARGET_RATIO)
        summary.append(f"S1 ratio {ratio:.2f}x with {val}: "
                       f"{verdict(ratio >= S1_TARGET_RATIO)}")
    if s2:
        n = s2["meta"]["records"]
        base = median_rate(s2["runs"]["sync"])
        rec = s2["recommended"]
        lat = f"{s2['latency_ms']:g}"
        for kind, runs in s2["runs"].items():
            if kind == "sync":
                continue
            c = kind.split("=")[1]
            if kind.startswith("orb-validate"):
                label = f"S2 @{lat} ms: target-orb, {val} (c={c}) vs sync one-request HTTP target"
            else:
                label = (f"S2 @{lat} ms: target-orb, {vol}, c={c}"
                         f"{' (volume config)' if int(c) == rec else ''} vs sync one-request "
                         "HTTP target")
            ratio = row(label, n, runs, base, S2_TARGET_RATIO)
            if kind == f"orb c={rec}":
                summary.append(f"S2 ratio {ratio:.2f}x with the volume config (c={rec}; target "
                               f">= {S2_TARGET_RATIO:g}x): {verdict(ratio >= S2_TARGET_RATIO)}")
            elif kind.startswith("orb-validate"):
                summary.append(f"S2 ratio {ratio:.2f}x with {val} (c={c}): "
                               f"{verdict(ratio >= S2_TARGET_RATIO)}")
        sync_ok = all_exact(s2["runs"]["sync"])
        summary.append(f"S2 baseline landed exactly N keys: {'yes' if sync_ok else 'NO'}")
    if s3:
        sizes = sorted(s3["runs"])
        peaks = {n: max(r.rss_mb for r in s3["runs"][n]) for n in sizes}
        for n in sizes:
            runs = s3["runs"][n]
            out.append(
                f"| S3 @0 ms: target-orb peak RSS, volume config ({vol}, c={args.concurrency}) "
                f"| {n:,} "
                f"| {fmt_rate(median_rate(runs))} | - | - | <{RSS_MAX_MB:g} MB: "
                f"{verdict(peaks[n] < RSS_MAX_MB)} | {peaks[n]:.0f} | "
                f"{'yes' if all_exact(runs) else 'NO'} ({len(runs)}/{len(runs)} runs) |")
        if len(sizes) >= 2:
            lo, hi = peaks[sizes[0]], peaks[sizes[-1]]
            growth = (hi - lo) / lo * 100 if lo else 0
            ok = abs(growth) <= RSS_FLAT_PCT and max(peaks.values()) < RSS_MAX_MB
            summary.append(
                f"S3 peak RSS {lo:.1f} MB at {sizes[0]:,} → {hi:.1f} MB at {sizes[-1]:,} "
                f"({growth:+.1f}%; target within +/-{RSS_FLAT_PCT:g}% and < {RSS_MAX_MB:g} MB): "
                f"{verdict(ok)}")
    out.append("")
    out += [f"- {line}" for line in summary]
    lost = any(
        not all_exact(rs)
        for sc in (s1, s2)
        if sc
        for k, rs in sc["runs"].items()
        if k != "noop"
    ) or (s3 is not None and any(not all_exact(rs) for rs in s3["runs"].values()))
    out.append(f"- Events lost or duplicated in any checked run: {'YES' if lost else 'none'} "
               "(stand-in received exactly the N generated keys, none twice, none with two "
               "bodies, no dead letters, final STATE = last input STATE).")

    out.append("")
    out.append("## Details")
    out.append("")
    out.append("| run | records | wall s (each round) | median rec/s | median CPU s "
               "(user+sys) | rec per CPU-s | stand-in CPU s | peak RSS MB (max) | "
               "requests | resent keys | final STATE ok |")
    out.append("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|")

    def detail(label: str, runs: list[Run]) -> None:
        if not runs:
            return
        walls = ", ".join(f"{r.seconds:.2f}" for r in runs)
        cpu = statistics.median(r.cpu_s for r in runs)
        per_cpu = runs[0].records / cpu if cpu else 0
        reqs = "/".join(str(r.checks.get("ingest_requests", "-")) for r in runs)
        resent = sum(r.checks.get("resent_keys", 0) for r in runs)
        sc = (f"{statistics.median(r.checks['standin_cpu_s'] for r in runs):.2f}"
              if runs[0].checks else "-")
        st = ("-" if not runs[0].checks
              else "yes" if all(r.checks.get("final_state_ok") for r in runs) else "NO")
        out.append(f"| {label} | {runs[0].records:,} | {walls} | {fmt_rate(median_rate(runs))} | "
                   f"{cpu:.2f} | {fmt_rate(per_cpu)} | {sc} | "
                   f"{max(r.rss_mb for r in runs):.0f} | {reqs} | "
                   f"{resent if runs[0].checks else '-'} | {st} |")

    if s1:
        detail("S1 no-op SDK-default target", s1["runs"]["noop"])
        detail(f"S1 target-orb c={s1['concurrency']} {vol}", s1["runs"]["orb"])
        detail(f"S1 target-orb c={s1['concurrency']} {val}", s1["runs"]["orb-validate"])
    if s2:
        detail(f"S2 sync HTTP target (@{s2['latency_ms']:g} ms)", s2["runs"]["sync"])
        for kind, runs in s2["runs"].items():
            if kind != "sync":
                c = kind.split("=")[1]
                detail(f"S2 target-orb c={c} " + (val if "validate" in kind else vol), runs)
    if s3:
        for _n, runs in sorted(s3["runs"].items()):
            detail(f"S3 target-orb {vol}", runs)
    if s1:
        st = s1["startup"]
        out.append("")
        out.append(f"Fixed start-up cost (a stream with no records; best of 2): target-orb "
                   f"{st['target-orb']:.2f} s (imports, config, ping), no-op target "
                   f"{st['noop']:.2f} s. It is included in every wall time above.")
        n = s1["meta"]["records"]
        orb = statistics.median(r.seconds for r in s1["runs"]["orb"])
        noop = statistics.median(r.seconds for r in s1["runs"]["noop"])
        if orb > st["target-orb"] and noop > st["noop"]:
            steady = (noop - st["noop"]) / (orb - st["target-orb"])
            out.append(f"Excluding it, S1's ratio (volume config) would be {steady:.2f}x "
                       f"({n / (orb - st['target-orb']):,.0f} vs "
                       f"{n / (noop - st['noop']):,.0f} rec/s).")
        if s2:
            rec = s2["recommended"]
            orb = statistics.median(r.seconds for r in s2["runs"][f"orb c={rec}"])
            sync = statistics.median(r.seconds for r in s2["runs"]["sync"])
            if orb > st["target-orb"] and sync > st["noop"]:
                steady = (sync - st["noop"]) / (orb - st["target-orb"])
                out.append(f"Excluding it, S2's ratio (volume config) would be {steady:.2f}x "
                           "(the no-op target's start-up standing in for the sync HTTP "
                           "target's, which imports the same SDK plus requests).")
    meta = (s1 or s2 or {}).get("meta")
    if meta:
        out.append("")
        out.append(f"Input: Segment Track records, {meta['avg_record_line_bytes']:.0f} bytes per "
                   f"RECORD line on average, {meta['states']} STATE messages, seed {meta['seed']}; "
                   "target-orb config: `batch_size_rows: 500`, `properties_passthrough: true`, "
                   "`external_customer_id_field: userId`, `progress_interval_seconds: 0`.")
    if prof:
        out += ["", "## Profile", "", prof]
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="target-orb benchmark (see benchmarks/README.md).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--records", type=int, default=None,
                   help="S1 records (default 200,000; S2 uses a quarter of it)")
    p.add_argument("--s2-records", type=int, default=None, help="S2 records (default 50,000)")
    p.add_argument("--rss-records", default=None,
                   help="S3 sizes, comma-separated (default 100000,1000000)")
    p.add_argument("--quick", action="store_true",
                   help="small smoke run: 20k/5k records, 1 round, S3 at 10k and 50k")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3)")
    p.add_argument("--rss-rounds", type=int, default=1, help="runs per S3 size")
    p.add_argument("--concurrency", type=int, default=8,
                   help="max_concurrent_requests used for S1, S3 and the S2 headline")
    p.add_argument("--s2-concurrency", default="4,8,16",
                   help="max_concurrent_requests values tried in S2")
    p.add_argument("--latency-ms", type=float, default=50.0, help="S2 stand-in latency")
    p.add_argument("--only", default="s1,s2,s3,bf", help="scenarios to run, e.g. s1,s2")
    p.add_argument("--bf-records", type=int, default=None,
                   help="BF: late events through backfills (default 100,000)")
    p.add_argument("--skip-rss-1m", action="store_true", help="S3 only at its smallest size")
    p.add_argument("--profile", action="store_true",
                   help="also cProfile target-orb on a 50k run and add the top functions")
    p.add_argument("--workdir", default=None, help="where inputs and logs go (default: tmp)")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("--out", default=str(RESULTS / "latest.md"), help="Markdown report path")
    args = p.parse_args(argv)
    if args.quick:
        args.records = args.records or 20_000
        args.s2_records = args.s2_records or 5_000
        args.rss_records = args.rss_records or "10000,50000"
        args.rounds = args.rounds or 1
        args.bf_records = args.bf_records or 10_000
    args.records = args.records or 200_000
    args.s2_records = args.s2_records or max(args.records // 4, 1)
    args.rss_records = args.rss_records or "100000,1000000"
    args.rounds = args.rounds or 3
    args.bf_records = args.bf_records or 100_000
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    only = {s.strip().lower() for s in args.only.split(",")}
    env = machine()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="target-orb-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    log(f"work directory {workdir}")
    started = time.perf_counter()
    s1 = s2 = s3 = bf = None
    prof = None
    bench = Bench(args, workdir)
    try:
        if "s1" in only:
            s1 = scenario_s1(bench, args.records, args.rounds, args.concurrency)
        if "s2" in only:
            concs = [int(c) for c in args.s2_concurrency.split(",") if c.strip()]
            if args.concurrency not in concs:
                concs.append(args.concurrency)
            s2 = scenario_s2(bench, args.s2_records, args.rounds, concurrencies=concs,
                             recommended=args.concurrency, latency_ms=args.latency_ms)
        if "s3" in only:
            sizes = sorted({int(x) for x in args.rss_records.split(",") if x.strip()})
            if args.skip_rss_1m:
                sizes = sizes[:1]
            s3 = scenario_s3(bench, sizes, args.rss_rounds, args.concurrency)
        if args.profile:
            prof = profile(bench, min(50_000, args.records), args.concurrency)
        if "bf" in only:
            bf = scenario_backfill(bench, run_child=run_child, target_cmd=TARGET_ORB,
                                   n=args.bf_records, rounds=args.rounds,
                                   concurrency=args.concurrency, log=log)
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    text = report(args, env, s1=s1, s2=s2, s3=s3, prof=prof,
                  elapsed=time.perf_counter() - started)
    text += "\n".join(report_backfill(bf)) + ("\n" if bf else "")
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    log(f"report written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
