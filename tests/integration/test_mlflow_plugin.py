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
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param
    from mlflow.tracking import fluent
    from trackd.mlflow_store import TrackdStore

    slow = []  # the store's single-entity calls: [method, key]
    batches = []  # the store's log_batch calls: [metric keys, param keys, tag keys]

    def count(name):
        original = getattr(TrackdStore, name)
        def counted(self, run_id, entity):
            slow.append([name, entity.key])
            return original(self, run_id, entity)
        setattr(TrackdStore, name, counted)
    for name in ("log_metric", "log_param", "set_tag"):
        count(name)
    original_batch = TrackdStore.log_batch
    def counted_batch(self, run_id, metrics, params, tags):
        batches.append([sorted(m.key for m in metrics), sorted(p.key for p in params),
                        sorted(t.key for t in tags)])
        return original_batch(self, run_id, metrics, params, tags)
    TrackdStore.log_batch = counted_batch

    TS0 = 1_700_000_000_000
    mlflow.set_experiment("fast-path")
    with mlflow.start_run(run_name="f") as r:
        rid = r.info.run_id
        for i in range(1000):
            mlflow.log_metric("loss", 1.0 / (i + 1), step=i, timestamp=TS0 + i)
        mlflow.log_metric("flag", True, step=0)  # a bool: MLflow's own path converts it
        for i in range(10):
            mlflow.log_metrics({"x": i * 1.5, "y": i}, step=i, timestamp=TS0)
        mlflow.log_metrics({"x": 0.0, "z": True}, step=10)  # MLflow's path again
        # More keys than one frame holds: still one timestamp for the call, as MLflow's.
        mlflow.log_metrics({f"wide{i}": 1.0 for i in range(2500)}, step=0)
        returned = [mlflow.log_param("lr", 0.1), mlflow.log_param("lr", 0.1),
                    mlflow.log_params({"a": 1, "b": "x"}), mlflow.set_tag("t", 1),
                    mlflow.set_tags({"u": "v", "w": 2.5})]
        mlflow.set_tag("mlflow.note.content", "n")  # a system tag: MLflow's path
        mlflow.log_param("long", "p" * 6001)  # truncated by MLflow, on its path
        c = MlflowClient()
        for i in range(100):
            returned.append(c.log_metric(rid, "c", i, timestamp=TS0 + i, step=i))
        c.log_metric(rid, "c0", 1.0, timestamp=0)  # MlflowClient keeps 0: MLflow's path
        returned.append(c.log_batch(rid, metrics=[Metric("lb", i * 0.5, TS0, i)
                                                  for i in range(50)]))
        c.log_batch(rid, metrics=[Metric("lb2", 1.0, TS0, 0)], params=[Param("q", "1")])
    wrapped = getattr(mlflow.log_metric, "__trackd_original__", None) is not None
    print(json.dumps({"run": rid, "slow": slow, "batches": batches, "wrapped": wrapped,
                      "fluent_wrapped": fluent.log_metric is mlflow.log_metric,
                      "returned": returned}))
''')


@pytest.mark.parametrize("switch", [None, "0"])
def test_mlflow_fast_paths_and_their_switch(pg, db, tmp_path, switch):
    """Under trackd:, mlflow.log_metric(s), log_param(s) and set_tag(s) on the active run and
    MlflowClient.log_metric/log_batch go straight to the agent once a store exists
    (set_experiment made it): the store sees only the calls MLflow must convert or check itself
    (a bool, a system tag, a value MLflow truncates, a timestamp of 0 on the client, a batch with
    params), with the same rows and return values; TRACKD_MLFLOW_FAST_PATH=0 leaves every call
    on MLflow's path."""
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
    assert out["returned"] == [0.1, 0.1, None, None, None] + [None] * 101
    if switch is None:
        assert out["wrapped"] and out["fluent_wrapped"]
        assert out["slow"] == [["log_metric", "flag"], ["set_tag", "mlflow.note.content"],
                               ["log_param", "long"], ["log_metric", "c0"]], out["slow"]
        assert out["batches"] == [[["x", "z"], [], []], [["lb2"], ["q"], []]], out["batches"]
    else:
        assert not out["wrapped"]
        assert out["slow"] == ([["log_metric", "loss"]] * 1000 + [["log_metric", "flag"]]
                               + [["log_param", "lr"]] * 2 + [["set_tag", "t"]]
                               + [["set_tag", "mlflow.note.content"], ["log_param", "long"]]
                               + [["log_metric", "c"]] * 100 + [["log_metric", "c0"]])
        metric_batches = [b[0] for b in out["batches"] if b[0]]
        assert metric_batches[:11] == [["x", "y"]] * 10 + [["x", "z"]]
        assert len(metric_batches) == 11 + 3 + 2  # 2,500 keys in chunks of 1,000; lb; lb2
        assert [b[1:] for b in out["batches"] if not b[0]] == [[["a", "b"], []], [[], ["u", "w"]]]
    run = (out["run"],)
    rows = pg.query(db, "SELECT count(*), min(step), max(step), min(value) FROM metrics"
                        " WHERE run_uuid = %s AND key = 'loss'", run)
    assert rows == [(1000, 0, 999, 1.0 / 1000)]
    assert pg.query(db, "SELECT key, value, step FROM latest_metrics WHERE run_uuid = %s"
                        " AND key NOT LIKE 'wide%%' ORDER BY key", run) == [
        ("c", 99.0, 99), ("c0", 1.0, 0), ("flag", 1.0, 0), ("lb", 24.5, 49), ("lb2", 1.0, 0),
        ("loss", 1.0 / 1000, 999), ("x", 0.0, 10), ("y", 9.0, 9), ("z", 1.0, 10)]
    assert pg.query(db, "SELECT count(*) FROM metrics WHERE run_uuid = %s AND key IN ('x', 'y')",
                    run) == [(21,)]
    assert pg.query(db, "SELECT count(*), count(DISTINCT timestamp) FROM metrics"
                        " WHERE run_uuid = %s AND key LIKE 'wide%%'", run) == [(2500, 1)]
    assert pg.query(db, "SELECT timestamp FROM metrics WHERE run_uuid = %s AND key = 'c0'",
                    run) == [(0,)]
    assert pg.query(db, "SELECT count(*), sum(step), min(timestamp) FROM metrics"
                        " WHERE run_uuid = %s AND key IN ('c', 'lb')", run) == [
        (150, sum(range(100)) + sum(range(50)), 1_700_000_000_000)]
    assert pg.query(db, "SELECT key, length(value), left(value, 3) FROM params"
                        " WHERE run_uuid = %s ORDER BY key", run) == [
        ("a", 1, "1"), ("b", 1, "x"), ("long", 6000, "ppp"), ("lr", 3, "0.1"), ("q", 1, "1")]
    assert pg.query(db, "SELECT key, value FROM tags WHERE run_uuid = %s AND key IN"
                        " ('t', 'u', 'w', 'mlflow.note.content') ORDER BY key", run) == [
        ("mlflow.note.content", "n"), ("t", "1"), ("u", "v"), ("w", "2.5")]
