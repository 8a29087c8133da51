"""Artifacts: what a 512 MiB upload costs the training process and the metric stream.

    .venv/bin/python bench/artifacts.py [--mib 512] [--points 400000] [--keys 100]

On one PostgreSQL 15 (default settings, fsync on), one agent, a local artifact store:
  call    mlflow.log_artifact(<mib> MiB file) under trackd: (the call only hands the open file
          over) against the same call on postgresql:// (MLflow copies the file itself), and the
          time until the file is readable through MLflow (the store's flush barrier).
  W1      <points> metric points through libtrackd until durable, alone; then again while a
          second process logs the <mib> MiB artifact (W3). Points/s of both, and their ratio.
Writes bench/results/<date>-<host>-artifacts.md and prints the table.
"""
import argparse
import datetime
import json
import os
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "integration"))
sys.path.insert(0, str(ROOT / "bench"))
import report  # noqa: E402
from harness import BUILD, Agent, Postgres, wait_for  # noqa: E402

TS0 = 1_700_000_000_000

CALL = textwrap.dedent('''
    import json, os, sys, time
    import mlflow
    from mlflow import MlflowClient
    path = sys.argv[1]
    with mlflow.start_run() as run:
        t0 = time.perf_counter()
        mlflow.log_artifact(path, "ckpt")
        call = time.perf_counter() - t0
        listed = MlflowClient().list_artifacts(run.info.run_id, "ckpt")   # waits for the upload
        visible = time.perf_counter() - t0
    assert [a.file_size for a in listed] == [os.path.getsize(path)], listed
    print(json.dumps({"call": call, "visible": visible}))
''')


def make_file(path, size):
    block = os.urandom(1 << 20)
    with open(path, "wb") as f:
        for _ in range(size >> 20):
            f.write(block)


def call_cost(uri, path, work, env_extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "TRACKD_"))}
    env.update(env_extra, MLFLOW_TRACKING_URI=uri)
    p = subprocess.run([sys.executable, "-c", CALL, str(path)], cwd=work, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def metric_run(agent, keys, steps, artifact=None):
    """Points through trackd-driver until durable; with artifact, a second client logs it
    once the first points are flowing. Returns (seconds, upload seconds or None, points/s
    committed while the upload ran or None)."""
    drv = subprocess.Popen([str(BUILD / "trackd-driver"), "--socket", agent.socket],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    drv.stdin.write(f"run\tr\tw1\tw1\tnow\ngen\tr\t{keys}\t{steps}\t{TS0}\n")
    drv.stdin.close()
    upload = window = None
    if artifact:
        base = agent.stats()["metrics_committed"]
        wait_for(lambda: agent.stats()["metrics_committed"] > base + 20_000, 60,
                 "the stream to be under way")
        c0 = agent.stats()["metrics_committed"]
        t0 = time.monotonic()
        out = subprocess.run([str(BUILD / "trackd-driver"), "--socket", agent.socket],
                             input=f"run\ta\tw3\tw3\tnow\nartifact\ta\t{artifact}\tckpt\n"
                                   "flush\t600000\n", capture_output=True, text=True,
                             timeout=900).stdout
        assert "flush\t0" in out, out
        upload = time.monotonic() - t0
        window = (agent.stats()["metrics_committed"] - c0) / upload
    out = drv.stdout.read()
    assert drv.wait(900) == 0
    gen = next(l.split("\t") for l in out.splitlines() if l.startswith("gen"))
    fields = dict(x.split("=") for x in gen[2:])
    assert fields["flush"] == "0" and fields["dropped"] == "0", gen
    return float(fields["durable_s"]), upload, window


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=512)
    ap.add_argument("--points", type=int, default=400_000)
    ap.add_argument("--keys", type=int, default=100)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()
    steps = args.points // args.keys
    n = steps * args.keys
    size = args.mib << 20

    work = Path(tempfile.mkdtemp(prefix="trackd-bench-art-"))
    os.chmod(work, 0o755)
    big = work / "model.bin"
    make_file(big, size)
    pg = Postgres().start(durable=True)
    try:
        print("bootstrapping MLflow's schema ...", flush=True)
        pg.bootstrap_template(work / "mlruns")
        db = pg.mlflow_db("bench_artifacts")
        agent = Agent(pg, db, work / "agent", artifact_root=str(work / "mlruns"),
                      log_level="info")
        agent.config.write_text(agent.config.read_text().replace(
            "[mlflow]\n", f'[mlflow]\nbackend_uri = "{pg.url(db)}"\n'))
        agent.start()
        try:
            print(f"mlflow.log_artifact of {args.mib} MiB under trackd: ...", flush=True)
            tr = call_cost(f"trackd://{agent.socket}", big, work, {})
            print(f"W1 alone: {n:,} points ...", flush=True)
            alone, _, _ = metric_run(agent, args.keys, steps)
            print(f"W1 with a {args.mib} MiB artifact from a second process ...", flush=True)
            during, upload, window = metric_run(agent, args.keys, steps, artifact=big)
            st = agent.stats()
        finally:
            assert agent.stop() == 0
        print(f"mlflow.log_artifact of {args.mib} MiB on postgresql:// ...", flush=True)
        db_ml = pg.mlflow_db("bench_artifacts_mlflow")
        ml = call_cost(pg.url(db_ml), big, work, {})
    finally:
        pg.stop()

    host = socket.gethostname()
    lines = [f"# Artifacts, {datetime.date.today()} on {host}", "", report.machine(),
             f"Artifact: {args.mib} MiB of random bytes; store: a local directory on the same "
             f"disk. Metrics: {n:,} points, {args.keys} keys x {steps:,} steps, one run.",
             f"Command: `.venv/bin/python bench/artifacts.py --mib {args.mib} --points "
             f"{args.points} --keys {args.keys}`", "",
             "| measure | trackd: | postgresql:// (MLflow itself) | ratio |",
             "|---|---:|---:|---:|",
             f"| mlflow.log_artifact call returns | {tr['call'] * 1000:.2f} ms | "
             f"{ml['call'] * 1000:.1f} ms | {ml['call'] / tr['call']:,.0f}x |",
             f"| ... until list_artifacts shows it | {tr['visible'] * 1000:.0f} ms | "
             f"{ml['visible'] * 1000:.0f} ms | |", "",
             "| W1 metric stream | seconds | points/s | vs alone |", "|---|---:|---:|---:|",
             f"| alone | {alone:.3f} | {n / alone:,.0f} | 1.00 |",
             f"| whole run, with a {args.mib} MiB upload from another process | {during:.3f} | "
             f"{n / during:,.0f} | {alone / during:.2f} |",
             f"| only while that upload ran ({upload:.2f} s) | | {window:,.0f} | "
             f"{window / (n / alone):.2f} |", "",
             f"- The {args.mib} MiB artifact of the second run took {upload:.2f} s from the call "
             "until its flush returned (spool copy, ledger row, copy into the store).",
             f"- Agent counters at the end: artifacts_uploaded={st['artifacts_uploaded']}, "
             f"artifact_bytes_uploaded={st['artifact_bytes_uploaded']:,}, "
             f"artifacts_failed={st['artifacts_failed']}."]
    report.write(args.out, "artifacts", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
