"""The same calls made through MLflow's own client (on postgresql://) and through the C
shim and agent produce equal rows in every tracking table, ids and wall-clock times aside."""
import json
import math
import os
import subprocess
import sys
import textwrap

from harness import Agent, driver_errors, driver_runs, run_driver

TS0 = 1_700_000_000_000

MLFLOW_SCRIPT = textwrap.dedent("""
    import json, sys
    import mlflow
    ops = json.load(open(sys.argv[1]))
    ids = {}
    for op in ops:
        kind, alias = op[0], op[1]
        if kind == "run":
            mlflow.set_experiment(op[2])
            run = mlflow.start_run(run_name=op[3], tags=op[4])
            ids[alias] = run.info.run_id
        elif kind == "metric":
            mlflow.log_metric(op[2], float(op[3]), step=op[4], timestamp=op[5])
        elif kind == "param":
            mlflow.log_param(op[2], op[3])
        elif kind == "tag":
            mlflow.set_tag(op[2], op[3])
        elif kind == "end":
            mlflow.end_run(status=op[2])
    print(json.dumps(ids))
""")


def make_ops():
    ops = []
    for alias, exp, name, status in [("a", "diff-exp", "run-a", "FINISHED"),
                                     ("b", "diff-exp", "run-b", "FAILED"),
                                     ("c", "other-exp", "run-c", "KILLED")]:
        ops.append(["run", alias, exp, name, {"team": "ml", "seed": alias}])
        ops += [["param", alias, "lr", "0.01"], ["param", alias, "layers", "3"],
                ["param", alias, "lr", "0.01"],  # the same value again: a no-op
                ["tag", alias, "stage", "dev"], ["tag", alias, "stage", "prod"]]
        steps = [0, 1, 2, 5, 4, 3, 9, 8, 7, 6, 10, 10, 11]
        for i, s in enumerate(steps):
            v = {4: "nan", 6: "inf", 7: "-inf"}.get(s, repr(math.cos(s) * (i + 1)))
            ops.append(["metric", alias, "loss", v, s, TS0 + s * 10])
            ops.append(["metric", alias, "acc/top1", repr(s / 20.0), s, TS0 + s * 10])
        ops.append(["metric", alias, "loss", repr(1.0), 3, TS0 + 30])  # exact duplicate of nothing
        ops.append(["metric", alias, "acc/top1", repr(3 / 20.0), 3, TS0 + 30])  # exact duplicate
        ops.append(["end", alias, status])
    return ops


def snapshot(pg, db, ids):
    alias = {v: k for k, v in ids.items()}
    exps = {r[0]: r[1] for r in pg.query(db, "SELECT experiment_id, name FROM experiments")}

    def norm(s):
        if isinstance(s, str):
            for rid, a in alias.items():
                s = s.replace(rid, f"<run {a}>")
        return s

    snap = {}
    snap["experiments"] = sorted(
        (name, norm(loc).rsplit("/", 1)[0], stage, ws)
        for eid, name, loc, stage, ws in pg.query(
            db, "SELECT experiment_id, name, artifact_location, lifecycle_stage, workspace"
                " FROM experiments WHERE experiment_id <> 0"))
    snap["runs"] = sorted(
        (alias[r[0]], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8], r[9],
         norm(r[10]).replace(f"/{r[11]}/", "/<exp>/"), exps[r[11]], r[12])
        for r in pg.query(db, "SELECT run_uuid, name, source_type, source_name, entry_point_name,"
                              " user_id, status, source_version, lifecycle_stage, end_time IS NULL,"
                              " artifact_uri, experiment_id, deleted_time FROM runs"))
    for table, cols in [("tags", "key, value"), ("params", "key, value"),
                        ("metrics", "key, value, timestamp, step, is_nan"),
                        ("latest_metrics", "key, value, timestamp, step, is_nan")]:
        snap[table] = sorted((alias[r[0]],) + tuple(norm(x) for x in r[1:])
                             for r in pg.query(db, f"SELECT run_uuid, {cols} FROM {table}"))
    return snap


def test_mlflow_and_trackd_write_the_same_rows(pg, tmp_path, artifact_root):
    ops = make_ops()
    work = tmp_path / "work"
    work.mkdir()
    script = work / "train.py"
    script.write_text(MLFLOW_SCRIPT)
    (work / "ops.json").write_text(json.dumps(ops))

    db_mlflow = pg.mlflow_db("diff_mlflow")
    env = dict(os.environ, MLFLOW_TRACKING_URI=pg.url(db_mlflow))
    p = subprocess.run([sys.executable, str(script), str(work / "ops.json")], cwd=work, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    mlflow_ids = json.loads(p.stdout.strip().splitlines()[-1])

    db_trackd = pg.mlflow_db("diff_trackd")
    # MLflow's default artifact root for a database URI: ./mlruns under the client's cwd.
    agent = Agent(pg, db_trackd, tmp_path / "agent", artifact_root=str(work / "mlruns")).start()
    try:
        lines = []
        for op in ops:
            if op[0] == "run":
                tags = [x for kv in op[4].items() for x in kv]
                lines.append(["run", op[1], op[2], op[3], "now"] + tags)
            elif op[0] == "metric":
                lines.append(["metric", op[1], op[2], op[3], str(op[4]), str(op[5])])
            elif op[0] in ("param", "tag"):
                lines.append(op)
            elif op[0] == "end":
                lines.append(["end", op[1], op[2], "now"])
        lines += [["flush", "60000"], ["errors"]]
        out, _ = run_driver(agent.socket, lines, source_name=str(script))
        assert driver_errors(out) == []
        trackd_ids = driver_runs(out)
    finally:
        assert agent.stop() == 0

    a = snapshot(pg, db_mlflow, mlflow_ids)
    b = snapshot(pg, db_trackd, trackd_ids)
    for table in a:
        assert a[table] == b[table], f"{table} differs"
    # Row counts, explicitly, for the note.
    for table in ("runs", "tags", "params", "metrics", "latest_metrics"):
        assert len(a[table]) == len(b[table]) > 0
