"""An unchanged MLflow training script, run once on postgresql:// and once on trackd:, into
two databases: MLflow's own client reads back the same data from both."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from harness import Agent

TS0 = 1_700_000_000_000

# A realistic script: only MLflow's public API, nothing trackd-specific.
SCRIPT = textwrap.dedent('''
    import json, math, sys
    import mlflow
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param, RunTag

    TS0 = 1_700_000_000_000
    ids = {}
    mlflow.set_experiment("compat-exp")
    with mlflow.start_run(run_name="parent", tags={"team": "ml"}) as parent:
        ids["parent"] = parent.info.run_id
        mlflow.log_params({"lr": 0.01, "layers": 3, "optimizer": "adam"})
        mlflow.set_tags({"phase": "train", "note": "first"})
        mlflow.set_tag("note", "second")
        steps = list(range(0, 60)) + list(range(70, 60, -1)) + [5, 5, 65]
        for i, step in enumerate(steps):
            value = {7: float("nan"), 8: float("inf"), 9: float("-inf")}.get(step, math.sin(step) + i)
            mlflow.log_metric("loss", value, step=step, timestamp=TS0 + step)
            mlflow.log_metrics({"acc": step / 100.0, "lr": 0.01}, step=step, timestamp=TS0 + step)
        mlflow.log_metric("acc", 0.05, step=5, timestamp=TS0 + 5)        # exact duplicate
        with mlflow.start_run(run_name="child", nested=True) as child:
            ids["child"] = child.info.run_id
            mlflow.log_param("fold", 1)
            for step in range(20):
                mlflow.log_metric("val/loss", 1.0 / (step + 1), step=step, timestamp=TS0 + step)
            mlflow.set_tag("temp", "x")
            MlflowClient().delete_tag(child.info.run_id, "temp")
    client = MlflowClient()
    exp = client.get_experiment_by_name("compat-exp")
    run = client.create_run(exp.experiment_id, run_name="batch-run", tags={"mlflow.user": "someone"})
    ids["batch"] = run.info.run_id
    client.log_batch(run.info.run_id,
                     metrics=[Metric("m", float(i), TS0 + i, i) for i in range(50)],
                     params=[Param("p", "v")], tags=[RunTag("t", "u")])
    client.set_terminated(run.info.run_id, "FAILED")
    mlflow.set_experiment("other-exp")
    with mlflow.start_run(run_name="to-rename") as r:
        ids["renamed"] = r.info.run_id
        mlflow.log_metric("x", 1.0, step=0, timestamp=TS0)
    client.update_run(ids["renamed"], name="renamed")
    try:
        with mlflow.start_run(run_name="fails"):
            ids["failed"] = mlflow.active_run().info.run_id
            mlflow.log_metric("x", 2.0, step=0, timestamp=TS0)
            raise RuntimeError("training diverged")
    except RuntimeError:
        pass
    print(json.dumps(ids))
''')

READ = textwrap.dedent('''
    import json, math, sys
    from mlflow import MlflowClient
    c = MlflowClient(sys.argv[1])
    ids = json.loads(sys.argv[2])
    alias = {v: k for k, v in ids.items()}
    out = {}
    for name in ("compat-exp", "other-exp"):
        exp = c.get_experiment_by_name(name)
        runs = c.search_runs([exp.experiment_id], order_by=["attributes.run_name"])
        out[name] = [alias[r.info.run_id] for r in runs]
    def clean(v):
        return "nan" if isinstance(v, float) and math.isnan(v) else v
    for a, rid in sorted(ids.items()):
        r = c.get_run(rid)
        tags = {k: (alias.get(v, v) if k == "mlflow.parentRunId" else v) for k, v in r.data.tags.items()}
        out[a] = {
            "name": r.info.run_name, "status": r.info.status, "stage": r.info.lifecycle_stage,
            "user": r.info.user_id, "ended": r.info.end_time is not None,
            "artifact_uri_tail": r.info.artifact_uri.split("/", )[-1],
            "params": r.data.params, "tags": tags,
            "metrics": {k: clean(v) for k, v in r.data.metrics.items()},
            "history": {k: sorted((m.step, m.timestamp, clean(m.value)) for m in
                                  c.get_metric_history(rid, k)) for k in r.data.metrics},
        }
    print(json.dumps(out, sort_keys=True))
''')


def _run(args, env, cwd, python=sys.executable, timeout=300):
    p = subprocess.run([python, *args], env=env, cwd=cwd, capture_output=True, text=True,
                       timeout=timeout)
    assert p.returncode == 0, p.stderr[-4000:]
    return p.stdout.strip().splitlines()[-1]


def compare_under_trackd(pg, tmp_path, python, new_db):
    """Runs SCRIPT with python's MLflow on postgresql:// and on trackd: (an agent with its
    default configuration but for the read URI), each into a database new_db(name) makes;
    MLflow's client reads both back and they must be equal. Returns what it read."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "train.py").write_text(SCRIPT)
    (work / "read.py").write_text(READ)
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "TRACKD_"))}

    db_ml = new_db("plugin_mlflow")
    ids_ml = json.loads(_run(["train.py"], dict(base, MLFLOW_TRACKING_URI=pg.url(db_ml)), work,
                             python))

    db_tr = new_db("plugin_trackd")
    agent = Agent(pg, db_tr, tmp_path / "agent", artifact_root=str(work / "mlruns"))
    agent.config.write_text(agent.config.read_text().replace(
        "[mlflow]\n", f'[mlflow]\nbackend_uri = "{pg.url(db_tr)}"\n'))
    agent.start()
    try:
        env = dict(base, MLFLOW_TRACKING_URI=f"trackd://{agent.socket}")
        ids_tr = json.loads(_run(["train.py"], env, work, python))
        stats = agent.stats()
    finally:
        assert agent.stop() == 0
    assert stats["metrics_committed"] > 0, "the trackd run did not write through the agent"
    assert stats["rejected_protocol"] == 0

    seen_ml = json.loads(_run(["read.py", pg.url(db_ml), json.dumps(ids_ml)], base, work, python))
    seen_tr = json.loads(_run(["read.py", pg.url(db_tr), json.dumps(ids_tr)], base, work, python))
    # Deliberate difference: a run made with MlflowClient.create_run records the user the
    # socket names (trackd's identity rule); MLflow records what the caller claimed.
    assert seen_ml["batch"]["user"] == "someone" and seen_tr["batch"]["user"] == "root"
    for s in (seen_ml, seen_tr):
        s["batch"]["user"] = "<user>"
        s["batch"]["tags"]["mlflow.user"] = "<user>"
    assert set(seen_ml) == set(seen_tr)
    for key in seen_ml:
        assert seen_ml[key] == seen_tr[key], f"{key} differs"
    assert seen_ml["parent"]["status"] == "FINISHED" and seen_ml["failed"]["status"] == "FAILED"
    assert seen_ml["child"]["tags"]["mlflow.parentRunId"] == "parent"
    assert len(seen_ml["parent"]["history"]["loss"]) == 73

    counts = "SELECT (SELECT count(*) FROM runs), (SELECT count(*) FROM tags)," \
             " (SELECT count(*) FROM params), (SELECT count(*) FROM metrics)," \
             " (SELECT count(*) FROM latest_metrics), (SELECT count(*) FROM experiments)"
    assert pg.query(db_ml, counts) == pg.query(db_tr, counts)
    return seen_tr, agent


def test_unchanged_mlflow_script_under_trackd(pg, tmp_path):
    pytest.importorskip("trackd._trackd")
    compare_under_trackd(pg, tmp_path, sys.executable, pg.mlflow_db)


FAST_SCRIPT = textwrap.dedent('''
    import json
    import mlflow
    from mlflow.tracking import fluent
    from trackd.mlflow_store import TrackdStore

    slow = []
    original = TrackdStore.log_metric
    def counted(self, run_id, metric):
        slow.append(metric.key)
        return original(self, run_id, metric)
    TrackdStore.log_metric = counted
    batches = []
    original_batch = TrackdStore.log_batch
    def counted_batch(self, run_id, metrics, params, tags):
        batches.append(sorted(m.key for m in metrics))
        return original_batch(self, run_id, metrics, params, tags)
    TrackdStore.log_batch = counted_batch

    mlflow.set_experiment("fast-path")
    with mlflow.start_run(run_name="f") as r:
        for i in range(1000):
            mlflow.log_metric("loss", 1.0 / (i + 1), step=i, timestamp=1_700_000_000_000 + i)
        mlflow.log_metric("flag", True, step=0)  # a bool: MLflow's own path converts it
        for i in range(10):
            mlflow.log_metrics({"x": i * 1.5, "y": i}, step=i, timestamp=1_700_000_000_000)
        mlflow.log_metrics({"x": 0.0, "z": True}, step=10)  # MLflow's path again
        # More keys than one frame holds: still one timestamp for the call, as MLflow's.
        mlflow.log_metrics({f"wide{i}": 1.0 for i in range(2500)}, step=0)
    wrapped = getattr(mlflow.log_metric, "__trackd_original__", None) is not None
    print(json.dumps({"run": r.info.run_id, "slow": slow, "batches": batches, "wrapped": wrapped,
                      "fluent_wrapped": fluent.log_metric is mlflow.log_metric}))
''')


@pytest.mark.parametrize("switch", [None, "0"])
def test_fluent_log_metric_fast_path_and_its_switch(pg, db, tmp_path, switch):
    """Under trackd:, mlflow.log_metric(s) on the active run go straight to the agent once a
    store exists (set_experiment made it): the store's log_metric and log_batch see only the
    calls MLflow must convert (a bool), and the rows are the same; TRACKD_MLFLOW_FAST_PATH=0
    leaves every call on MLflow's path."""
    pytest.importorskip("trackd._trackd")
    agent = Agent(pg, db, tmp_path / "agent").start()
    try:
        base = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "TRACKD_"))}
        env = dict(base, MLFLOW_TRACKING_URI=f"trackd://{agent.socket}",
                   TRACKD_BACKEND_URI=pg.url(db))
        if switch is not None:
            env["TRACKD_MLFLOW_FAST_PATH"] = switch
        (tmp_path / "fast.py").write_text(FAST_SCRIPT)
        out = json.loads(_run(["fast.py"], env, tmp_path))
    finally:
        assert agent.stop() == 0
    if switch is None:
        assert out["wrapped"] and out["fluent_wrapped"]
        assert out["slow"] == ["flag"], out["slow"]
        assert out["batches"] == [["x", "z"]], out["batches"]
    else:
        assert not out["wrapped"]
        assert out["slow"] == ["loss"] * 1000 + ["flag"]
        assert out["batches"][:11] == [["x", "y"]] * 10 + [["x", "z"]]
        assert len(out["batches"]) == 14  # the 2,500 keys in MLflow's chunks of 1,000
    rows = pg.query(db, "SELECT count(*), min(step), max(step), min(value) FROM metrics"
                        " WHERE run_uuid = %s AND key = 'loss'", (out["run"],))
    assert rows == [(1000, 0, 999, 1.0 / 1000)]
    assert pg.query(db, "SELECT key, value, step FROM latest_metrics WHERE run_uuid = %s"
                        " AND key NOT LIKE 'wide%%' ORDER BY key", (out["run"],)) == [
        ("flag", 1.0, 0), ("loss", 1.0 / 1000, 999), ("x", 0.0, 10), ("y", 9.0, 9), ("z", 1.0, 10)]
    assert pg.query(db, "SELECT count(*) FROM metrics WHERE run_uuid = %s AND key IN ('x', 'y')",
                    (out["run"],)) == [(21,)]
    assert pg.query(db, "SELECT count(*), count(DISTINCT timestamp) FROM metrics"
                        " WHERE run_uuid = %s AND key LIKE 'wide%%'", (out["run"],)) == [(2500, 1)]
