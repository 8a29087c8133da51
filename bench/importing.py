"""IMPORT: moving an existing MLflow file store into a database, three ways, on one source.

  I-T  `trackd import SOURCE` (the agent's command, a configuration naming only the database)
       into a fresh copy of MLflow's schema in PostgreSQL
  I-M  `mlflow migrate-filestore --source SOURCE --target sqlite:///…` (MLflow >= 3.10: SQLite
       is the only target it takes)
  I-R  the export-import way: MlflowClient reads each run from the file store and writes it
       through MlflowClient into PostgreSQL (create_run, log_batch of params and tags, the
       metric histories in log_batch calls of 1,000, set_terminated); fewer runs, by rate
  L    PostgreSQL's own server-side COPY of the same metric rows from a file into a fresh
       database that already holds the runs: what the metrics table's keys and foreign key
       cost per row on this machine, with no client at all
  L2   the same rows in two halves, loaded by two backends at once (trackd import's default
       --jobs 2): the most two writer connections can reach here

The source is logged by MLflow's own FileStore: RUNS runs x 10 keys x 100 steps (1,000,000
points at --scale 1), 5 params and 3 tags a run. Every time is wall-clock from the command's
start to its exit (I-R: to its last call's return), so I-T and I-M include their start-up.
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

RUNS = 1000
KEYS, STEPS = 10, 100
REPLAY_SHARE = 0.05  # I-R replays this share of the runs (at least 5)

GENERATE = r"""
import os, sys
os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
c = MlflowClient(tracking_uri="file://" + sys.argv[1])
e = c.create_experiment("import-bench")
for r in range(int(sys.argv[2])):
    run = c.create_run(e, run_name=f"run-{r}")
    c.log_batch(run.info.run_id,
                metrics=[Metric(f"metric_{k}", 0.5 * s + k, 1_700_000_000_000 + s, s)
                         for k in range(%d) for s in range(%d)],
                params=[Param(f"p{i}", str(i)) for i in range(5)],
                tags=[RunTag(f"t{i}", "x") for i in range(3)])
    c.set_terminated(run.info.run_id)
""" % (KEYS, STEPS)

REPLAY = r"""
import os, sys, time
os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
from mlflow import MlflowClient
from mlflow.entities import Param, RunTag, ViewType
src = MlflowClient(tracking_uri="file://" + sys.argv[1])
dst = MlflowClient(tracking_uri=sys.argv[2])
n = int(sys.argv[3])
t0 = time.monotonic()
points = 0
exp = src.get_experiment_by_name("import-bench")
new = dst.create_experiment("import-bench")
for run in src.search_runs([exp.experiment_id], run_view_type=ViewType.ALL, max_results=n):
    i = run.info
    r = dst.create_run(new, start_time=i.start_time, run_name=i.run_name)
    rid = r.info.run_id
    dst.log_batch(rid, params=[Param(k, v) for k, v in run.data.params.items()],
                  tags=[RunTag(k, v) for k, v in run.data.tags.items()
                        if not k.startswith("mlflow.runName")])
    history = [m for k in run.data.metrics for m in src.get_metric_history(i.run_id, k)]
    for j in range(0, len(history), 1000):
        dst.log_batch(rid, metrics=history[j:j + 1000])
    points += len(history)
    dst.set_terminated(rid, i.status, end_time=i.end_time)
print(points, time.monotonic() - t0)
"""


def run(b, scale: float, log) -> dict:
    """Runs the four contenders on one generated source; returns the rows for section()."""
    from harness import BUILD

    work = b.work / "import"
    work.mkdir(exist_ok=True)
    runs = max(4, int(RUNS * scale))
    src = work / "mlruns"
    env = {**b.base_env, "MLFLOW_ALLOW_FILE_STORE": "true"}
    log(f"IMPORT: logging {runs:,} runs x {KEYS * STEPS:,} points into an MLflow file store ...")
    t = time.monotonic()
    subprocess.run([sys.executable, "-c", GENERATE, str(src), str(runs)], check=True, env=env,
                   capture_output=True)
    log(f"  {time.monotonic() - t:.0f} s")
    points = runs * KEYS * STEPS
    rows = []

    db = b.db("import_t")
    cfg = work / "import.toml"
    cfg.write_text(f'[postgres]\ndsn = "{b.pg.dsn(db)}"\n')
    path = f"{Path(sys.executable).parent}:{os.environ['PATH']}"
    log("IMPORT I-T: trackd import ...")
    t = time.monotonic()
    out = subprocess.run([str(BUILD / "trackd"), "import", str(src), "--config", str(cfg),
                          "--no-progress"], env={**env, "PATH": path}, capture_output=True,
                         text=True)
    dt = time.monotonic() - t
    if out.returncode != 0:
        raise RuntimeError(f"trackd import failed: {out.stderr[-500:]}")
    got = b.pg.query(db, "SELECT count(*) FROM metrics")[0][0]
    if got != points:
        raise RuntimeError(f"trackd import wrote {got:,} metric rows, not {points:,}")
    rows.append({"contender": "I-T", "runs": runs, "points": points, "seconds": dt,
                 "into": "PostgreSQL"})
    log(f"  {dt:.1f} s")

    log("IMPORT I-M: mlflow migrate-filestore ...")
    target = work / "migrated.db"
    mlflow = Path(sys.executable).parent / "mlflow"
    t = time.monotonic()
    out = subprocess.run([str(mlflow), "migrate-filestore", "--source", str(src), "--target",
                          f"sqlite:///{target}"], env=env, capture_output=True, text=True)
    dt = time.monotonic() - t
    if out.returncode != 0:
        raise RuntimeError(f"mlflow migrate-filestore failed: {out.stderr[-500:]}")
    import sqlite3
    with sqlite3.connect(target) as c:
        got = c.execute("SELECT count(*) FROM metrics").fetchone()[0]
    if got != points:
        raise RuntimeError(f"migrate-filestore wrote {got:,} metric rows, not {points:,}")
    rows.append({"contender": "I-M", "runs": runs, "points": points, "seconds": dt,
                 "into": "SQLite"})
    log(f"  {dt:.1f} s")

    n = min(runs, max(5, int(runs * REPLAY_SHARE)))
    db_r = b.db("import_r")
    log(f"IMPORT I-R: replaying {n} runs through MlflowClient ...")
    t = time.monotonic()
    out = subprocess.run([sys.executable, "-c", REPLAY, str(src), b.pg.url(db_r), str(n)],
                         env=env, capture_output=True, text=True)
    dt = time.monotonic() - t
    if out.returncode != 0:
        raise RuntimeError(f"the replay failed: {out.stderr[-500:]}")
    replayed = int(out.stdout.split()[-2])
    got = b.pg.query(db_r, "SELECT count(*) FROM metrics")[0][0]
    if got != replayed or replayed != n * KEYS * STEPS:
        raise RuntimeError(f"the replay wrote {got:,} metric rows of {replayed:,}")
    rows.append({"contender": "I-R", "runs": n, "points": replayed, "seconds": dt,
                 "into": "PostgreSQL"})
    log(f"  {dt:.1f} s")

    log("IMPORT L: server-side COPY of the same metric rows ...")
    dump = work / "metrics.copy"
    os.chmod(work, 0o777)
    with b.pg.connect(db) as c:
        c.execute(f"COPY metrics TO '{dump}'")
    db_l = b.db("import_l")
    with b.pg.connect(db) as src_c, b.pg.connect(db_l) as c:
        for query, table in (("SELECT * FROM experiments WHERE experiment_id <> 0",
                              "experiments"), ("SELECT * FROM runs", "runs")):
            with src_c.cursor().copy(f"COPY ({query}) TO STDOUT") as out_copy:
                data = b"".join(bytes(chunk) for chunk in out_copy)
            with c.cursor().copy(f"COPY {table} FROM STDIN") as in_copy:
                in_copy.write(data)
    db_l2 = b.db("import_l2")
    with b.pg.connect(db_l) as src_c, b.pg.connect(db_l2) as c:
        for query, table in (("SELECT * FROM experiments WHERE experiment_id <> 0",
                              "experiments"), ("SELECT * FROM runs", "runs")):
            with src_c.cursor().copy(f"COPY ({query}) TO STDOUT") as out_copy:
                data = b"".join(bytes(chunk) for chunk in out_copy)
            with c.cursor().copy(f"COPY {table} FROM STDIN") as in_copy:
                in_copy.write(data)
    with b.pg.connect(db_l) as c:
        t = time.monotonic()
        c.execute(f"COPY metrics FROM '{dump}'")
        dt = time.monotonic() - t
    rows.append({"contender": "L", "runs": runs, "points": points, "seconds": dt,
                 "into": "PostgreSQL"})
    log(f"  {dt:.1f} s")

    # The same rows in two halves, each by its own backend at once: what two writer
    # connections could reach with a client that cost nothing.
    lines = dump.read_bytes().splitlines(keepends=True)
    halves = [work / "metrics-1.copy", work / "metrics-2.copy"]
    halves[0].write_bytes(b"".join(lines[:len(lines) // 2]))
    halves[1].write_bytes(b"".join(lines[len(lines) // 2:]))
    del lines

    def load(path):
        with b.pg.connect(db_l2) as c:
            c.execute(f"COPY metrics FROM '{path}'")

    log("IMPORT L2: the same, in two halves by two backends at once ...")
    threads = [threading.Thread(target=load, args=(h,)) for h in halves]
    t = time.monotonic()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    dt = time.monotonic() - t
    got = b.pg.query(db_l2, "SELECT count(*) FROM metrics")[0][0]
    if got != points:
        raise RuntimeError(f"L2 loaded {got:,} metric rows, not {points:,}")
    rows.append({"contender": "L2", "runs": runs, "points": points, "seconds": dt,
                 "into": "PostgreSQL"})
    log(f"  {dt:.1f} s")
    for f in [dump, *halves]:
        f.unlink()
    return {"rows": rows, "runs": runs}


def _rate(r) -> float:
    return r["points"] / r["seconds"]


def targets(result: dict) -> list:
    """(target, measured, met) rows for the results file's Targets table."""
    rows = {r["contender"]: r for r in result["rows"]}
    out = []
    for c, goal in (("I-M", 10), ("I-R", 100)):
        if "I-T" in rows and c in rows:
            x = _rate(rows["I-T"]) / _rate(rows[c])
            out.append((f"I-T >= {goal} x {c} (IMPORT)", f"{x:.1f} x {c}", x >= goal))
    return out


def section(result: dict) -> list:
    """The results file's IMPORT section."""
    rows = {r["contender"]: r for r in result["rows"]}
    rate = _rate
    what = {"I-T": "trackd import", "I-M": "mlflow migrate-filestore",
            "I-R": "MlflowClient replay", "L": "server-side COPY of the metric rows alone",
            "L2": "L in two halves by two backends at once"}
    L = ["## IMPORT: an MLflow file store into a database", "",
         f"Source: {result['runs']:,} runs x {KEYS} keys x {STEPS} steps logged by MLflow's "
         "FileStore. Seconds are wall-clock, start-up included.", "",
         "| contender | into | runs | metric points | seconds | points/s | I-T ÷ this |",
         "|---|---|---:|---:|---:|---:|---:|"]
    for c in ("I-T", "I-M", "I-R", "L", "L2"):
        if c in rows:
            r = rows[c]
            ratio = f"{rate(rows['I-T']) / rate(r):.2f}" if "I-T" in rows else "–"
            L.append(f"| {c} ({what[c]}) | {r['into']} | {r['runs']:,} | {r['points']:,} | "
                     f"{r['seconds']:.1f} | {rate(r):,.0f} | {ratio} |")
    L.append("")
    if "I-T" in rows:
        t = rate(rows["I-T"])
        for c in ("L", "L2"):
            if c in rows and "I-M" in rows:
                L.append(f"- I-T reaches {t / rate(rows[c]):.2f} × {c} ({what[c]}), which has no "
                         "client, no parsing and no other table; "
                         f"{c} itself is {rate(rows[c]) / rate(rows['I-M']):.1f} × I-M")
        L.append("")
    return L
