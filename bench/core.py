"""Core throughput: N metric points through the C shim and the agent until durable, against
the same rows loaded by psql \\copy, back to back on the same PostgreSQL.

    .venv/bin/python bench/core.py [--points 1000000] [--keys 100]

Contenders, each into a fresh MLflow database on one PostgreSQL 15 (default settings, fsync on):
  T-C     trackd-driver logs the points through libtrackd; timed from the first call until
          trackd_flush() returns (every point committed in metrics and latest_metrics).
  L-raw   psql \\copy of the same rows straight into metrics (no dedup, no latest_metrics).
  L       psql \\copy into a staging table, then the same INSERT ... ON CONFLICT into metrics and
          latest_metrics upsert that trackd runs, in one transaction.
Writes bench/results/<date>-<host>-core.md and prints the table.
"""
import argparse
import datetime
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "integration"))
sys.path.insert(0, str(ROOT / "bench"))
import report  # noqa: E402
from harness import BUILD, Agent, Postgres, driver_runs, run_driver  # noqa: E402

TS0 = 1_700_000_000_000


def psql(pg, db, *args, input=None):
    return subprocess.run(["psql", "-h", str(pg.dir), "-U", "postgres", "-d", db, "-v", "ON_ERROR_STOP=1",
                           "-q", *args], input=input, capture_output=True, text=True, check=True)


def make_run(pg, db):
    """A run row for the psql contenders, made by the agent's own SQL shape."""
    run_id = "0" * 31 + "1"
    exp = pg.query(db, "SELECT experiment_id FROM experiments WHERE experiment_id = 0")[0][0]
    pg.query(db, "INSERT INTO runs (run_uuid, name, source_type, source_name, entry_point_name, user_id,"
                 " status, start_time, source_version, lifecycle_stage, artifact_uri, experiment_id)"
                 " VALUES (%s, 'bench', 'UNKNOWN', '', '', 'bench', 'RUNNING', 0, '', 'active', '', %s)"
                 " RETURNING 1", (run_id, exp))
    return run_id


def write_rows(path, run_id, keys, steps):
    """The exact rows trackd-driver's gen command logs: key m<k>, value (s*keys+k)*0.5."""
    with open(path, "w") as f:
        for s in range(steps):
            ts = TS0 + s
            for k in range(keys):
                f.write(f"m{k}\t{(s * keys + k) * 0.5!r}\t{ts}\t{run_id}\t{s}\tf\n")


def timed(fn):
    t0 = time.monotonic()
    fn()
    return time.monotonic() - t0


STAGE_SQL = """
BEGIN;
CREATE TEMP TABLE stage (key text, value float8, "timestamp" int8, run_uuid text, step int8,
                         is_nan bool) ON COMMIT DROP;
\\copy stage FROM '{path}'
INSERT INTO metrics (key, value, "timestamp", run_uuid, step, is_nan)
  SELECT key, value, "timestamp", run_uuid, step, is_nan FROM stage ON CONFLICT DO NOTHING;
INSERT INTO latest_metrics (key, value, "timestamp", step, is_nan, run_uuid)
  SELECT key, value, "timestamp", step, is_nan, run_uuid FROM (
    SELECT DISTINCT ON (run_uuid, key) * FROM stage
    ORDER BY run_uuid, key, step DESC, "timestamp" DESC, value DESC) s
  ORDER BY run_uuid, key
  ON CONFLICT (key, run_uuid) DO UPDATE SET value = EXCLUDED.value, "timestamp" = EXCLUDED."timestamp",
    step = EXCLUDED.step, is_nan = EXCLUDED.is_nan
  WHERE (EXCLUDED.step, EXCLUDED."timestamp", EXCLUDED.value)
      > (latest_metrics.step, latest_metrics."timestamp", latest_metrics.value);
COMMIT;
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--points", type=int, default=1_000_000)
    ap.add_argument("--keys", type=int, default=100)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()
    steps = args.points // args.keys
    n = steps * args.keys

    work = Path(tempfile.mkdtemp(prefix="trackd-bench-"))
    os.chmod(work, 0o755)
    pg = Postgres().start(durable=True)
    results = []
    try:
        print(f"bootstrapping MLflow's schema ...", flush=True)
        pg.bootstrap_template(work / "mlruns")

        print(f"T-C: {n:,} points through libtrackd and the agent ...", flush=True)
        db = pg.mlflow_db("bench_trackd")
        agent = Agent(pg, db, work / "agent", artifact_root=str(work / "mlruns"), log_level="info").start()
        out, _ = run_driver(agent.socket, [["run", "r", "bench", "bench", "now"],
                                           ["gen", "r", str(args.keys), str(steps), str(TS0)]])
        gen = next(f for f in out if f[0] == "gen")
        fields = dict(x.split("=") for x in gen[2:])
        assert fields["flush"] == "0" and fields["dropped"] == "0", gen
        run_id = driver_runs(out)["r"]
        committed = pg.query(db, "SELECT count(*) FROM metrics WHERE run_uuid = %s", (run_id,))[0][0]
        assert committed == n, (committed, n)
        stats = agent.stats()
        assert agent.stop() == 0
        t_c = float(fields["durable_s"])
        results.append(("T-C", "libtrackd -> agent -> COPY + upserts, until flush returns", t_c,
                        f"log calls {float(fields['log_s']):.3f} s ({float(fields['log_s']) / n * 1e9:.0f} ns/call);"
                        f" {stats['batches_committed']} transactions"))

        rows = work / "rows.tsv"
        db_raw = pg.mlflow_db("bench_copy_raw")
        rid = make_run(pg, db_raw)
        write_rows(rows, rid, args.keys, steps)
        print("L-raw: psql \\copy into metrics ...", flush=True)
        t_raw = timed(lambda: psql(pg, db_raw, "-c", f"\\copy metrics (key, value, timestamp, run_uuid, step, is_nan) FROM '{rows}'"))
        assert pg.query(db_raw, "SELECT count(*) FROM metrics")[0][0] == n
        results.append(("L-raw", "psql \\copy straight into metrics (no dedup, no latest_metrics)", t_raw, ""))

        db_l = pg.mlflow_db("bench_copy_stage")
        make_run(pg, db_l)
        print("L: psql \\copy into staging + trackd's statements ...", flush=True)
        t_l = timed(lambda: psql(pg, db_l, input=STAGE_SQL.format(path=rows)))
        assert pg.query(db_l, "SELECT count(*) FROM metrics")[0][0] == n
        assert pg.query(db_l, "SELECT count(*) FROM latest_metrics")[0][0] == args.keys
        results.append(("L", "psql \\copy into staging + INSERT ON CONFLICT + latest_metrics upsert", t_l, ""))
    finally:
        pg.stop()

    host = socket.gethostname()
    lines = [f"# Core throughput, {datetime.date.today()} on {host}", "",
             report.machine(),
             f"Workload: {n:,} metric points, {args.keys} keys x {steps:,} steps, one run.",
             f"Command: `.venv/bin/python bench/core.py --points {args.points} --keys {args.keys}`", "",
             "| contender | what | seconds | points/s | vs L |", "|---|---|---:|---:|---:|"]
    for name, what, secs, note in results:
        lines.append(f"| {name} | {what} | {secs:.3f} | {n / secs:,.0f} | {t_l / secs:.2f} |")
    lines.append("")
    lines += [f"- {name}: {note}" for name, _, _, note in results if note]
    report.write(args.out, "core", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
