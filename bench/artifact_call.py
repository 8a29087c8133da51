"""What trackd.log_artifact costs the training loop, now that it guarantees the bytes of the call.

    .venv/bin/python bench/artifact_call.py [--calls 200]

One PostgreSQL 15 and one agent (default settings, local artifact store). For each file size,
the median and p99 of `trackd.log_artifact(path)` in a loop that rewrites the file before
each call (just written: files up to 1 MiB are copied at the call, larger ones wait for the
next clock tick), and for larger files, the same call on a file last written over a second
ago (no wait). Side by side: `shutil.copy2` of the same file, which is what MLflow's local
artifact repository does inside `mlflow.log_artifact`. Writes
bench/results/<date>-<host>-artifact-call.md and prints the table.
"""
import argparse
import datetime
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "integration"))
import trackd  # noqa: E402
from harness import Agent, Postgres  # noqa: E402

SIZES = [("4 KiB", 4 << 10), ("64 KiB", 64 << 10), ("1 MiB", 1 << 20), ("4 MiB", 4 << 20),
         ("64 MiB", 64 << 20)]


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * p))]


def measure(path, size, calls, fresh):
    """Microseconds per log_artifact call and per shutil.copy2 of the same file."""
    data = os.urandom(size)
    path.write_bytes(data)
    if not fresh:
        os.utime(path, (time.time() - 5, time.time() - 5))
    ours, copies = [], []
    dest = path.with_suffix(".copy")
    for i in range(calls):
        if fresh:
            path.write_bytes(data)
        t0 = time.perf_counter()
        trackd.log_artifact(path, f"c{i}")
        ours.append((time.perf_counter() - t0) * 1e6)
        t0 = time.perf_counter()
        shutil.copy2(path, dest)
        copies.append((time.perf_counter() - t0) * 1e6)
        if i % 20 == 19:
            flush()  # keeps the spool and the store from piling up
    flush()
    return ours, copies


def flush():
    """Waits for the uploads; refusals of files rewritten after their call are expected."""
    try:
        trackd.flush(600)
    except trackd.TrackdError:
        pass


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="trackd-bench-call-"))
    pg = Postgres().start(durable=True)
    agent = None
    try:
        pg.bootstrap_template(work / "mlruns")
        db = pg.mlflow_db("bench_call")
        agent = Agent(pg, db, work / "agent", artifact_root=str(work / "store"),
                      log_level="info").start()
        trackd.start_run("artifact-call", socket=agent.socket)
        rows = []
        for name, size in SIZES:
            calls = args.calls if size <= (4 << 20) else max(10, args.calls // 10)
            for fresh in (True, False):
                if fresh is False and size <= (1 << 20):
                    continue  # copied at the call either way
                ours, copies = measure(work / "f.bin", size, calls, fresh)
                rows.append((name, "just written" if fresh else "written 5 s ago", calls,
                             statistics.median(ours), pct(ours, 0.99),
                             statistics.median(copies)))
                print(rows[-1], flush=True)
        trackd.errors()
        trackd.end_run()
    finally:
        trackd.shutdown(60)
        if agent:
            agent.stop()
        pg.stop()
        shutil.rmtree(work, ignore_errors=True)

    host = socket.gethostname()
    lines = [f"# trackd.log_artifact call cost, {datetime.date.today()} on {host} "
             f"({os.cpu_count()} CPUs)", "",
             "| file | last written | calls | log_artifact p50 µs | p99 µs | shutil.copy2 p50 µs "
             "| log_artifact / copy2 |", "|---|---|---:|---:|---:|---:|---:|"]
    for name, when, calls, p50, p99, copy in rows:
        lines.append(f"| {name} | {when} | {calls} | {p50:.0f} | {p99:.0f} | {copy:.0f} | "
                     f"{p50 / copy:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{datetime.date.today()}-{host}-artifact-call.md").write_text(text)


if __name__ == "__main__":
    main()
