"""Per-call cost in the training process, side by side in one run:

    .venv/bin/python bench/calls.py [--n 100000] [--n-slow 2000]

  T-Py   trackd.log_metric (the trackd package, through libtrackd)
  T-M    mlflow.log_metric with MLFLOW_TRACKING_URI=trackd:  (MLflow's fluent API, the plugin)
  M1     mlflow.log_metric with MLFLOW_TRACKING_URI=postgresql://  (MLflow's own store)

Each contender logs into a fresh MLflow database on one PostgreSQL 15 (default settings),
timing every call with perf_counter_ns; the slow contender runs n-slow calls. Each trackd
contender ends with a flush, and the rows are counted, so the calls measured really landed.
Writes bench/results/<date>-<host>-calls.md.
"""
import argparse
import datetime
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "integration"))
sys.path.insert(0, str(ROOT / "bench"))
import report  # noqa: E402
from harness import Agent, Postgres  # noqa: E402

WORKER = textwrap.dedent('''
    import json, os, sys, time
    mode, n = sys.argv[1], int(sys.argv[2])
    t = time.perf_counter_ns
    lat = []
    if mode == "T-Py":
        import trackd
        with trackd.start_run(experiment="bench", run_name="t-py") as run:
            for i in range(n):
                a = t(); trackd.log_metric("loss", i * 0.5, step=i); lat.append(t() - a)
            a = t(); ok = trackd.flush(timeout=600); flush_s = (t() - a) / 1e9
        run_id = run.run_id
    else:
        import mlflow
        mlflow.set_experiment("bench")
        with mlflow.start_run(run_name=mode) as run:
            for i in range(n):
                a = t(); mlflow.log_metric("loss", i * 0.5, step=i); lat.append(t() - a)
            a = t(); mlflow.flush_async_logging(); flush_s = (t() - a) / 1e9
            ok = True
        run_id = run.info.run_id
    print(json.dumps({"lat": lat, "flush_s": flush_s, "ok": ok, "run_id": run_id}))
''')


def pct(sorted_ns, p):
    return sorted_ns[min(len(sorted_ns) - 1, int(p / 100 * len(sorted_ns)))]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--n-slow", type=int, default=2_000)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="trackd-bench-calls-"))
    os.chmod(work, 0o755)
    (work / "worker.py").write_text(WORKER)
    pg = Postgres().start(durable=True)
    rows = []
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "TRACKD_"))}
    try:
        pg.bootstrap_template(work / "mlruns")
        for mode in ("T-Py", "T-M", "M1"):
            n = args.n_slow if mode == "M1" else args.n
            db = pg.mlflow_db(f"calls_{mode.lower().replace('-', '_')}")
            env = dict(base)
            agent = None
            if mode == "M1":
                env["MLFLOW_TRACKING_URI"] = pg.url(db)
            else:
                agent = Agent(pg, db, work / f"agent-{mode}", artifact_root=str(work / "mlruns"),
                              log_level="info")
                agent.config.write_text(agent.config.read_text().replace(
                    "[mlflow]\n", f'[mlflow]\nbackend_uri = "{pg.url(db)}"\n'))
                agent.start()
                env["TRACKD_SOCKET"] = agent.socket
                env["MLFLOW_TRACKING_URI"] = f"trackd://{agent.socket}"
            print(f"{mode}: {n:,} calls ...", flush=True)
            try:
                p = subprocess.run([sys.executable, str(work / "worker.py"), mode, str(n)], env=env,
                                   cwd=work, capture_output=True, text=True, timeout=3600)
                assert p.returncode == 0, p.stderr[-3000:]
                res = json.loads(p.stdout.strip().splitlines()[-1])
            finally:
                if agent:
                    assert agent.stop() == 0
            landed = pg.query(db, "SELECT count(*) FROM metrics WHERE run_uuid = %s", (res["run_id"],))[0][0]
            assert landed == n, (mode, landed, n)
            lat = sorted(res["lat"])
            rows.append((mode, n, pct(lat, 50), pct(lat, 99), pct(lat, 99.9), sum(lat) / n, res["flush_s"]))
    finally:
        pg.stop()

    host = socket.gethostname()
    m1_p50 = next(r[2] for r in rows if r[0] == "M1")
    lines = [f"# Per-call cost of log_metric, {datetime.date.today()} on {host}", "",
             report.machine(),
             f"Command: `.venv/bin/python bench/calls.py --n {args.n} --n-slow {args.n_slow}`", "",
             "| contender | calls | p50 µs | p99 µs | p99.9 µs | mean µs | M1 p50 / p50 | final flush s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for mode, n, p50, p99, p999, mean, flush_s in rows:
        lines.append(f"| {mode} | {n:,} | {p50 / 1e3:.2f} | {p99 / 1e3:.2f} | {p999 / 1e3:.2f} | "
                     f"{mean / 1e3:.2f} | {m1_p50 / p50:.0f}x | {flush_s:.3f} |")
    lines += ["", "T-Py: `trackd.log_metric`; T-M: `mlflow.log_metric` under `trackd:`; "
                  "M1: `mlflow.log_metric` under `postgresql://`. Every call's rows were counted in "
                  "`metrics` after the run."]
    report.write(args.out, "calls", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
