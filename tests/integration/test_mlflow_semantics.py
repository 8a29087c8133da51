"""MLflow's semantics under trackd:, case by case. Each case is an unchanged MLflow script run
twice, on postgresql:// and on trackd: (an agent with its default configuration: only the
socket, the database and the journal directory are set, as every deployment sets them), into
two databases. Compared per case: every call's outcome (the exception class and message, ids
replaced by aliases), what the script read back, and the rows of runs, params, tags, metrics,
latest_metrics and experiments, with two deliberate differences: artifact locations (MLflow
puts them under the script's ./mlruns, the agent under its default root) and the run's user
(the agent records the user the socket names, where MlflowClient.create_run lets MLflow record
"unknown" or what the caller claims).

Every case runs with the pinned MLflow and with each release of the compatibility matrix
(test_compat.py), on databases that release made and with its client; in the sanitizer pass
(TRACKD_SUITE=sanitizers: the agent's code is the same for every release, test_compat.py
covers each release's statements there) with the pinned one only."""
import getpass
import json
import math
import os
import re
import subprocess
import sys
import textwrap

import pytest
from harness import Agent, wait_for
from test_compat import compat_envs, release_db

PINNED = "3.17.2"
RELEASES = [(PINNED, sys.executable)] + (
    [] if os.environ.get("TRACKD_SUITE") == "sanitizers" else compat_envs())
# The matrix installs mlflow-skinny (the tracking client and store); these cases need
# scikit-learn and MLflow's model flavours, which only the pinned environment has.
NEEDS_FULL_MLFLOW = {"sklearn_log_model", "sklearn_autolog"}
# The matrix's postgresql:// goes through psycopg2 (MLflow 2.x does not run on psycopg 3),
# which cannot store numpy integers: MLflow fails those calls with "can't adapt type
# 'numpy.int32'" where the pinned release (psycopg 3) and trackd take them; and a fractional
# step or timestamp is rounded half to even there (2.5 -> 2), half away from zero by the pinned
# release and trackd (2.5 -> 3). Not compared there: those calls, and the metrics they write.
DRIVER_DEPENDENT = {"input_types": ({"step_np_i32", "ts_np_i64"},
                                    {"s_np_i32", "t_np_i64", "s_float_frac", "t_float_frac"})}
TS0 = 1_700_000_000_000

PRELUDE = textwrap.dedent('''
    import json, os, re, subprocess, sys, threading
    import mlflow
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param, RunTag

    TS0 = 1_700_000_000_000
    RESULT = {"steps": [], "ids": {}, "read": {}}

    def note(alias, run_id):
        RESULT["ids"][alias] = run_id

    def step(name, fn, *args, **kwargs):
        """Runs one call and records its outcome: ok, or the exception's class and text."""
        try:
            value = fn(*args, **kwargs)
            RESULT["steps"].append([name, "ok"])
            return value
        except Exception as e:
            RESULT["steps"].append([name, type(e).__name__, str(e)])

    def read(name, value):
        RESULT["read"][name] = value

    def step_in_thread(name, fn, *args, **kwargs):
        """step() on a thread of its own; a run the call started there is noted as "thread"
        and ended."""
        def worker():
            started = mlflow.active_run() is None
            step(name, fn, *args, **kwargs)
            if started:
                note("thread", mlflow.active_run().info.run_id)
                mlflow.end_run()
        t = threading.Thread(target=worker)
        t.start()
        t.join()

    def synced(fn, *args, **kwargs):
        """fn, then a read: under trackd: a read is the barrier where the agent's answer to
        a write arrives (MLflow answers at the call)."""
        value = fn(*args, **kwargs)
        MlflowClient().search_experiments(max_results=1)
        return value

    def write(path, text):
        with open(path, "w") as f:
            f.write(text)
''')

EPILOGUE = '\nprint("RESULT " + json.dumps(RESULT))\n'

CASES = {
    # A first experiment and run with nothing configured for artifacts: the agent's default
    # root must serve the upload and MLflow must read it back.
    "new_experiment_first_run": '''
        def body():
            mlflow.set_experiment("brand-new")
            with mlflow.start_run(run_name="first") as r:
                note("r", r.info.run_id)
                mlflow.log_param("lr", 0.1)
                mlflow.log_metric("loss", 0.5, step=1, timestamp=TS0)
                mlflow.set_tag("k", "v")
                write("report.txt", "epoch 1: loss 0.5\\n")
                mlflow.log_artifact("report.txt", artifact_path="reports")
            c = MlflowClient()
            read("listed", sorted(f.path for f in c.list_artifacts(r.info.run_id, "reports")))
            path = mlflow.artifacts.download_artifacts(run_id=r.info.run_id,
                                                       artifact_path="reports/report.txt")
            read("content", open(path).read())
            read("status", c.get_run(r.info.run_id).info.status)
        step("script", body)
    ''',
    # A run without a name gets MLflow's random one, in runs.name and the mlflow.runName tag.
    "random_run_name": '''
        def body():
            mlflow.set_experiment("names")
            with mlflow.start_run() as r:
                note("r", r.info.run_id)
                read("name_matches_tag", r.info.run_name == r.data.tags["mlflow.runName"])
            run = MlflowClient().get_run(r.info.run_id)
            read("stored_name_matches", run.info.run_name == r.info.run_name != "")
        step("script", body)
    ''',
    # Experiments whose artifact location has another scheme: starting, logging and ending
    # a run needs no artifact repository (mlflow-artifacts: cannot be built for trackd:).
    "served_artifacts_experiment": '''
        def body():
            c = MlflowClient()
            c.create_experiment("served", artifact_location="mlflow-artifacts:/served")
            mlflow.set_experiment("served")
            with mlflow.start_run(run_name="s") as r:
                note("r", r.info.run_id)
                mlflow.log_metric("m", 1.0, step=0, timestamp=TS0)
                mlflow.log_param("p", "x")
            read("artifact_uri", c.get_run(r.info.run_id).info.artifact_uri.replace(
                r.info.run_id, "<r>"))
        step("script", body)
    ''',
    "file_uri_experiment": '''
        def body():
            c = MlflowClient()
            root = "file://" + os.path.abspath("store")
            c.create_experiment("files", artifact_location=root)
            mlflow.set_experiment("files")
            write("a.txt", "A")
            os.makedirs("d/sub", exist_ok=True)
            write("d/b.txt", "B")
            write("d/sub/c.txt", "C")
            with mlflow.start_run(run_name="f") as r:
                note("r", r.info.run_id)
                mlflow.log_artifact("a.txt")
                mlflow.log_artifacts("d", artifact_path="dir")
            read("top", sorted((f.path, f.is_dir) for f in c.list_artifacts(r.info.run_id)))
            read("dir", sorted((f.path, f.is_dir) for f in c.list_artifacts(r.info.run_id, "dir")))
            read("file", open(os.path.join("store", r.info.run_id, "artifacts", "dir", "sub",
                                           "c.txt")).read())
        step("script", body)
    ''',
    # A param changed inside the block: MLflow raises at the call and the run ends FAILED.
    "param_changed_in_block": '''
        def body():
            mlflow.set_experiment("params")
            with mlflow.start_run(run_name="p") as r:
                note("r", r.info.run_id)
                mlflow.log_param("lr", 0.1)
                mlflow.log_param("lr", 0.1)
                mlflow.log_param("lr", 0.2)
                mlflow.log_metric("never", 1.0)
        step("script", body)
    ''',
    "params_batch_changed": '''
        def body():
            mlflow.set_experiment("params")
            with mlflow.start_run(run_name="b") as r:
                note("r", r.info.run_id)
                mlflow.log_params({"a": 1, "b": "two"})
                step("again", mlflow.log_params, {"a": 1, "c": 3.5})
                step("changed", mlflow.log_params, {"a": 2, "d": "new"})
                step("one", mlflow.log_param, "b", "three")
        step("script", body)
    ''',
    # A changed param caught by the script, then an explicit end: the run is FINISHED.
    "param_changed_caught": '''
        def body():
            mlflow.set_experiment("params")
            r = mlflow.start_run(run_name="c")
            note("r", r.info.run_id)
            mlflow.log_param("lr", 1)
            step("changed", mlflow.log_param, "lr", 2)
            mlflow.end_run()
        step("script", body)
    ''',
    # The value in the database differs from the one this process logs now (the run was
    # resumed by a new process): MLflow raises at the call; trackd learns it from the agent,
    # ends the run FAILED all the same and raises MlflowException when the block ends.
    "param_changed_in_database": '''
        def body():
            mlflow.set_experiment("params")
            with mlflow.start_run(run_name="d") as r:
                note("r", r.info.run_id)
                mlflow.log_param("lr", 0.1)
            code = ("import mlflow, sys\\n"
                    "with mlflow.start_run(run_id=sys.argv[1]):\\n"
                    "    mlflow.log_param('lr', 0.3)\\n")
            p = subprocess.run([sys.executable, "-c", code, r.info.run_id], capture_output=True,
                               text=True)
            read("resumed_exit", p.returncode)
            # The exception's class only: MLflow's own text here is the database driver's
            # unique-violation message, which trackd has no reason to imitate.
            raised = re.findall(r"^([A-Za-z_.]+(?:Exception|Error)): ", p.stderr, re.M)
            read("resumed_raised", raised[-1:])
            read("status", MlflowClient().get_run(r.info.run_id).info.status)
        step("script", body)
    ''',
    # An artifact path that leaves the run's directory: refused at the call, as MLflow's
    # artifact repository refuses it; the run ends FAILED.
    "artifact_path_escapes": '''
        def body():
            mlflow.set_experiment("paths")
            write("f.txt", "x")
            with mlflow.start_run(run_name="e") as r:
                note("r", r.info.run_id)
                mlflow.log_artifact("f.txt", artifact_path="../outside")
        step("script", body)
        step("dir", mlflow.log_artifacts, ".", artifact_path="a/../../b")
    ''',
    # MlflowClient's own lifecycle calls.
    "client_lifecycle": '''
        def body():
            c = MlflowClient()
            exp = c.create_experiment("client-exp")
            r = c.create_run(exp, run_name="cr", tags={"t": "1"})
            note("r", r.info.run_id)
            c.log_param(r.info.run_id, "p", 5)
            c.log_metric(r.info.run_id, "m", 2.5, timestamp=TS0, step=3)
            c.set_tag(r.info.run_id, "t", "2")
            c.set_terminated(r.info.run_id, "KILLED", end_time=TS0 + 10)
            read("status", c.get_run(r.info.run_id).info.status)
            r2 = c.create_run(exp, run_name="renamed-later")
            note("r2", r2.info.run_id)
            c.update_run(r2.info.run_id, name="renamed")
            c.set_terminated(r2.info.run_id)
        step("script", body)
    ''',
    # A run the script never ends: MLflow ends it FINISHED at exit.
    "ended_at_exit": '''
        mlflow.set_experiment("exit")
        r = mlflow.start_run(run_name="x")
        note("r", r.info.run_id)
        mlflow.log_metric("m", 3.0, step=1, timestamp=TS0)
        mlflow.log_param("p", "v")
    ''',
    # Every write to a run another client deleted is refused, as MLflow refuses it, until the
    # run is restored.
    "deleted_run_writes": '''
        def body():
            c = MlflowClient()
            exp = c.create_experiment("deleted-runs")
            rid = c.create_run(exp, run_name="gone").info.run_id
            note("r", rid)
            c.log_param(rid, "before", 1)
            c.set_tag(rid, "t", "kept")
            c.delete_run(rid)
            step("log_metric", synced, c.log_metric, rid, "m", 1.0, timestamp=TS0, step=0)
            step("log_param", synced, c.log_param, rid, "p", "v")
            step("set_tag", synced, c.set_tag, rid, "t", "v")
            step("delete_tag", synced, c.delete_tag, rid, "t")
            step("log_batch", synced, c.log_batch, rid, metrics=[Metric("b", 2.0, TS0, 1)],
                 params=[Param("q", "1")], tags=[RunTag("u", "1")])
            step("set_terminated", synced, c.set_terminated, rid, "FINISHED")
            c.restore_run(rid)
            step("after_restore", synced, c.log_metric, rid, "m", 3.0, timestamp=TS0, step=1)
            c.set_terminated(rid, end_time=TS0 + 5)
        step("script", body)
    ''',
    # A run id no run has.
    "unknown_run_writes": '''
        def body():
            c = MlflowClient()
            rid = "0123456789abcdef0123456789abcdef"
            step("log_metric", synced, c.log_metric, rid, "m", 1.0, timestamp=TS0, step=0)
            step("log_param", synced, c.log_param, rid, "p", "v")
            step("set_tag", synced, c.set_tag, rid, "t", "v")
            step("delete_tag", synced, c.delete_tag, rid, "t")
            step("set_terminated", synced, c.set_terminated, rid, "KILLED")
        step("script", body)
    ''',
    # A run started in an experiment another client deleted after this process knew it.
    "deleted_experiment_start": '''
        def body():
            c = MlflowClient()
            exp = c.create_experiment("short-lived")
            r = c.create_run(exp, run_name="one")
            note("r", r.info.run_id)
            c.set_terminated(r.info.run_id, end_time=TS0)
            c.delete_experiment(exp)
            step("create_run", synced, c.create_run, exp, run_name="two")
            step("set_experiment", mlflow.set_experiment, "short-lived")
            step("start_run", synced, mlflow.start_run, experiment_id=exp, run_name="three")
        step("script", body)
    ''',
    # The value, step and timestamp types MLflow accepts, and those it refuses, with its words.
    "input_types": '''
        import numpy as np
        def body():
            mlflow.set_experiment("types")
            with mlflow.start_run(run_name="t") as r:
                note("r", r.info.run_id)
                values = [("int", 3), ("float", 2.5), ("bool", True), ("np_f32", np.float32(1.25)),
                          ("np_f64", np.float64(-0.5)), ("np_i64", np.int64(7)),
                          ("np_bool", np.bool_(False)), ("big", 10**20), ("str", "1.5"),
                          ("none", None), ("list", [1.0])]
                for i, (k, v) in enumerate(values):
                    step("value_" + k, synced, mlflow.log_metric, "v_" + k, v, step=i,
                         timestamp=TS0 + i)
                steps = [("float_whole", 3.0), ("np_i32", np.int32(4)), ("float_frac", 2.5),
                         ("str", "5"), ("negative", -1), ("none", None)]
                for k, s in steps:
                    step("step_" + k, synced, mlflow.log_metric, "s_" + k, 1.0, step=s,
                         timestamp=TS0)
                stamps = [("float_whole", float(TS0 + 1)), ("np_i64", np.int64(TS0 + 2)),
                          ("str", str(TS0)), ("float_frac", TS0 + 0.5)]
                for k, t in stamps:
                    step("ts_" + k, synced, mlflow.log_metric, "t_" + k, 1.0, step=0,
                         timestamp=t)
                for k, v in [("int", 1), ("float", 0.1), ("bool", False), ("none", None),
                             ("np", np.float32(0.5)), ("list", [1, 2]), ("dict", {"a": 1})]:
                    step("param_" + k, synced, mlflow.log_param, "p_" + k, v)
                    step("tag_" + k, synced, mlflow.set_tag, "t_" + k, v)
        step("script", body)
    ''',
    # MLflow 3's logged models: metrics with a model id, given or from the active model, and
    # with a dataset, land in logged_model_metrics too; the model reads them back.
    "model_metrics": '''
        def body():
            mlflow.set_experiment("models")
            with mlflow.start_run(run_name="m") as r:
                note("r", r.info.run_id)
                model = mlflow.initialize_logged_model(name="net")
                mlflow.log_metric("acc", 0.9, step=1, timestamp=TS0, model_id=model.model_id)
                mlflow.log_metrics({"f1": 0.8, "p": 0.7}, step=2, timestamp=TS0 + 1,
                                   model_id=model.model_id)
                import numpy as np
                ds = mlflow.data.from_numpy(np.arange(4.0), name="eval", digest="e1")
                mlflow.log_metric("eval_acc", 0.75, step=2, timestamp=TS0 + 4,
                                  model_id=model.model_id, dataset=ds)
                mlflow.set_active_model(model_id=model.model_id)
                mlflow.log_metric("loss", 0.1, step=3, timestamp=TS0 + 2)
                mlflow.log_metric("plain", 1.0, step=0, timestamp=TS0 + 3, model_id=None)
            got = mlflow.get_logged_model(model.model_id)
            read("model_metrics", sorted((m.key, m.value, m.step, m.timestamp)
                                         for m in got.metrics))
        step("script", body)
    ''',
    # The script a new user tries first: a new experiment, params, metrics, tags, an artifact
    # and a scikit-learn model, which MLflow loads back and which predicts the same.
    "sklearn_log_model": '''
        import numpy as np
        from sklearn.linear_model import LogisticRegression
        def body():
            X = np.array([[0.0, 1.0], [1.0, 0.0], [1.0, 1.0], [0.0, 0.0]] * 5)
            y = np.array([1, 0, 1, 0] * 5)
            mlflow.set_experiment("sklearn-first")
            with mlflow.start_run(run_name="lr") as r:
                note("r", r.info.run_id)
                clf = LogisticRegression(C=0.5).fit(X, y)
                mlflow.log_params({"C": 0.5, "solver": clf.solver})
                mlflow.log_metric("train_acc", float(clf.score(X, y)), step=0, timestamp=TS0)
                mlflow.set_tag("team", "ml")
                write("notes.txt", "fitted\\n")
                mlflow.log_artifact("notes.txt")
                info = mlflow.sklearn.log_model(clf, name="model", input_example=X[:2])
            loaded = mlflow.sklearn.load_model(info.model_uri)
            read("predictions", loaded.predict(X[:4]).tolist())
            read("artifacts", sorted(f.path for f in MlflowClient().list_artifacts(r.info.run_id)))
            read("model_name", mlflow.get_logged_model(info.model_id).name)
        step("script", body)
    ''',
    # autolog: params, metrics of the run and of the logged model (63 logged_model_metrics
    # rows for this estimator under MLflow 3.17), the model itself.
    "sklearn_autolog": '''
        import numpy as np
        from sklearn.linear_model import LogisticRegression
        def body():
            X = np.array([[0.0, 1.0], [1.0, 0.0], [1.0, 1.0], [0.0, 0.0]] * 5)
            y = np.array([1, 0, 1, 0] * 5)
            mlflow.set_experiment("sklearn-auto")
            # Not silent: an error autolog swallows is then in the script's stderr.
            mlflow.sklearn.autolog(log_input_examples=False)
            with mlflow.start_run(run_name="auto") as r:
                note("r", r.info.run_id)
                LogisticRegression(C=0.5).fit(X, y)
            models = mlflow.search_logged_models(experiment_ids=[r.info.experiment_id],
                                                 output_format="list")
            read("models", len(models))
            read("model_metrics", sorted((m.key, round(m.value, 9), m.step)
                                         for m in models[0].metrics))
        step("script", body)
    ''',
    # The rest of the tracking write API: artifact helpers, dataset inputs, experiment tags and
    # names, nested runs, run names, terminal statuses.
    "other_write_calls": '''
        import numpy as np
        def body():
            c = MlflowClient()
            exp = mlflow.set_experiment("others").experiment_id
            mlflow.set_experiment_tag("owner", "ml")
            mlflow.set_experiment_tags({"a": "1", "b": 2})
            with mlflow.start_run(run_name="outer") as r:
                note("r", r.info.run_id)
                mlflow.log_dict({"k": [1, 2]}, "conf/config.json")
                mlflow.log_text("hello", "notes/hello.txt")
                ds = mlflow.data.from_numpy(np.arange(6).reshape(3, 2), name="train",
                                            digest="d1")
                mlflow.log_input(ds, context="training")
                mlflow.set_tags({"x": 1, "y": "two"})
                mlflow.log_metrics({"m1": 1.0, "m2": 2.0}, step=4, timestamp=TS0)
                with mlflow.start_run(run_name="inner", nested=True) as n:
                    note("n", n.info.run_id)
                    mlflow.log_param("depth", 2)
                c.update_run(r.info.run_id, name="outer-renamed")
                mlflow.end_run(status="KILLED")
            c.rename_experiment(exp, "others-renamed")
            run = c.get_run(r.info.run_id)
            read("inputs", [(d.dataset.name, d.dataset.digest, [t.value for t in d.tags])
                            for d in run.inputs.dataset_inputs])
            read("artifacts", sorted(f.path for f in c.list_artifacts(r.info.run_id)))
            read("config", mlflow.artifacts.load_dict(run.info.artifact_uri + "/conf/config.json"))
            read("experiment", [c.get_experiment(exp).name,
                                sorted(c.get_experiment(exp).tags.items())])
            read("status", [run.info.status, run.info.run_name])
        step("script", body)
    ''',
    # A run started by experiment id after the experiment was renamed and another took its
    # name: MLflow puts it in the experiment with that id, not in the namesake.
    "renamed_experiment_namesake": '''
        def body():
            c = MlflowClient()
            old = c.create_experiment("namesake")
            r1 = c.create_run(old, run_name="first")
            note("r1", r1.info.run_id)
            c.set_terminated(r1.info.run_id, end_time=TS0)
            c.rename_experiment(old, "namesake-old")
            c.create_experiment("namesake")
            r2 = c.create_run(old, run_name="second")
            note("r2", r2.info.run_id)
            c.set_terminated(r2.info.run_id, end_time=TS0)
            read("second_in", c.get_experiment(c.get_run(r2.info.run_id).info.experiment_id).name)
            step("unknown_id", synced, c.create_run, "987654")
        step("script", body)
    ''',
    # mlflow.log_metric(s)' forms around trackd's fast path (trackd/mlflow_fast.py): the calls it
    # takes and those it leaves to MLflow, in one script, so that the two ways meet: an
    # auto-started run, nested runs, a thread, bad keys met twice, values MLflow converts,
    # async logging, and a tracking URI changed between calls.
    "fluent_log_metric_forms": '''
        import numpy as np
        def body():
            mlflow.set_experiment("fluent-forms")
            step("auto", mlflow.log_metric, "auto", 1.0, step=1, timestamp=TS0)
            note("auto", mlflow.active_run().info.run_id)
            mlflow.end_run()
            with mlflow.start_run(run_name="outer") as outer:
                note("outer", outer.info.run_id)
                read("plain", repr(mlflow.log_metric("m", 0.5, step=3, timestamp=TS0 + 1)))
                step("no_step", mlflow.log_metric, "m", 1, timestamp=TS0 + 2)
                step("step_zero", mlflow.log_metric, "m", 2, step=0, timestamp=TS0 + 3)
                step("sync_true", mlflow.log_metric, "m", 3.5, 4, True, TS0 + 4)
                step("big_int", mlflow.log_metric, "m", 10**20, step=5, timestamp=TS0 + 5)
                step("huge_int", synced, mlflow.log_metric, "m", 2**1100, step=6, timestamp=TS0)
                step("nan", mlflow.log_metric, "m", float("nan"), step=7, timestamp=TS0 + 6)
                step("inf", mlflow.log_metric, "m", float("-inf"), step=8, timestamp=TS0 + 7)
                step("np", mlflow.log_metric, "m", np.float64(0.25), step=9, timestamp=TS0 + 8)
                step("bool", mlflow.log_metric, "m", True, step=10, timestamp=TS0 + 9)
                step("same_point", mlflow.log_metric, "m", 0.5, step=3, timestamp=TS0 + 1)
                for attempt in range(2):
                    step(f"bad_key_{attempt}", synced, mlflow.log_metric, "bad key!", 1.0)
                    step(f"long_key_{attempt}", synced, mlflow.log_metric, "k" * 251, 1.0)
                step("negative_ts", synced, mlflow.log_metric, "m", 1.0, step=11, timestamp=-1)
                step("int64_step", mlflow.log_metric, "m", 1.0, step=2**63 - 1, timestamp=TS0)
                read("metrics_returns", repr(mlflow.log_metrics({"a": 1, "b": 0.5}, step=2,
                                                                timestamp=TS0)))
                step("metrics_no_step", mlflow.log_metrics, {"a": 2.0, "c": -1}, timestamp=TS0 + 1)
                step("metrics_empty", mlflow.log_metrics, {})
                step("metrics_bad_key", synced, mlflow.log_metrics, {"a": 3.0, "bad key!": 1.0},
                     step=3, timestamp=TS0)
                step("metrics_bool", mlflow.log_metrics, {"a": 4.0, "flag": False}, step=4,
                     timestamp=TS0)
                step("metrics_np", mlflow.log_metrics, {"a": np.float32(5.0)}, step=5,
                     timestamp=TS0)
                step("metrics_huge", synced, mlflow.log_metrics, {"a": 6.0, "h": 2**1100},
                     step=6, timestamp=TS0)
                step("metrics_nan", mlflow.log_metrics, {"a": float("nan"), "i": float("inf")},
                     step=7, timestamp=TS0)
                step("metrics_neg_ts", synced, mlflow.log_metrics, {"a": 8.0}, step=8,
                     timestamp=-5)
                step("run_id_given", mlflow.log_metric, "given", 1.0, step=0, timestamp=TS0,
                     run_id=outer.info.run_id)
                # MLflow reads any synchronous value but None and True as asynchronous.
                ops = mlflow.log_metric("sync_zero", 1.0, step=0, timestamp=TS0, synchronous=0)
                read("sync_zero_returns", type(ops).__name__)
                if ops is not None:
                    ops.wait()
                # A keyword of MLflow 3 (model_id): MLflow 2 refuses it, even as None.
                step("model_id_none", mlflow.log_metric, "mn", 1.0, step=0, timestamp=TS0,
                     model_id=None)
                ops = mlflow.log_metric("async", 1.0, step=0, timestamp=TS0, synchronous=False)
                read("async_returns", type(ops).__name__)
                ops.wait()
                with mlflow.start_run(run_name="inner", nested=True) as inner:
                    note("inner", inner.info.run_id)
                    step("nested", mlflow.log_metric, "n", 1.0, step=0, timestamp=TS0)
                step("after_nested", mlflow.log_metric, "n", 2.0, step=1, timestamp=TS0)

                step_in_thread("thread", mlflow.log_metric, "thread", 1.0, step=0, timestamp=TS0)

                os.environ["MLFLOW_ENABLE_ASYNC_LOGGING"] = "true"
                read("env_async_returns",
                     type(mlflow.log_metric("env_async", 1.0, step=0, timestamp=TS0)).__name__)
                mlflow.flush_async_logging()
                del os.environ["MLFLOW_ENABLE_ASYNC_LOGGING"]

                uri = mlflow.get_tracking_uri()
                mlflow.set_tracking_uri("sqlite:///other.db")
                step("other_store", mlflow.log_metric, "elsewhere", 1.0, step=0, timestamp=TS0)
                mlflow.set_tracking_uri(uri)
                step("back", synced, mlflow.log_metric, "m", 9.0, step=12, timestamp=TS0 + 10)
            c = MlflowClient()
            read("history", sorted((m.step, m.timestamp, m.value)  # NaN never compared
                                   for m in c.get_metric_history(outer.info.run_id, "m")))
        step("script", body)
    ''',
    # The now-stamped forms (no timestamp, and 0, which MLflow reads as none): the wall clock.
    "fluent_log_metric_now": '''
        import time
        def body():
            mlflow.set_experiment("fluent-now")
            with mlflow.start_run(run_name="now") as r:
                note("r", r.info.run_id)
                t0 = int(time.time() * 1000)
                mlflow.log_metric("none", 1.0, step=1)
                mlflow.log_metric("zero", 2.0, step=2, timestamp=0)
                mlflow.log_metrics({"many_none": 1.0, "many_none2": 2}, step=3)
                mlflow.log_metrics({"many_zero": 1.0}, step=4, timestamp=0)
                t1 = int(time.time() * 1000)
            c = MlflowClient()
            read("within_call", [t0 <= m.timestamp <= t1
                                 for k in ("none", "zero", "many_none", "many_none2", "many_zero")
                                 for m in c.get_metric_history(r.info.run_id, k)])
        step("script", body)
    ''',
    # mlflow.log_param(s) and set_tag(s) around trackd's fast path (trackd/mlflow_fast.py): the
    # calls it takes and those it leaves to MLflow (a changed param, values MLflow truncates,
    # system tags, bad keys met twice, more params than one MLflow batch, async logging, another
    # store), in one script, so that the two ways meet.
    "fluent_param_tag_forms": '''
        import numpy as np
        def body():
            mlflow.set_experiment("param-forms")
            read("auto_returns", repr(mlflow.log_param("auto", 1)))
            note("auto", mlflow.active_run().info.run_id)
            mlflow.end_run()
            with mlflow.start_run(run_name="outer") as outer:
                note("outer", outer.info.run_id)
                read("param_returns", repr(mlflow.log_param("lr", 0.1)))
                read("param_same", repr(mlflow.log_param("lr", 0.1)))
                step("param_changed", mlflow.log_param, "lr", 0.2)
                read("param_sync", repr(mlflow.log_param("s", "x", True)))
                step("param_types", mlflow.log_params, {"i": 1, "f": 0.5, "n": None, "l": [1, 2],
                                                        "np": np.float32(0.5), "b": True})
                read("params_returns", repr(mlflow.log_params({"p1": "a", "p2": "b"})))
                step("params_changed", mlflow.log_params, {"p1": "a", "p2": "c", "p3": "d"})
                step("params_empty", mlflow.log_params, {})
                step("params_many", mlflow.log_params, {f"m{i}": i for i in range(150)})
                for attempt in range(2):
                    step(f"bad_key_{attempt}", synced, mlflow.log_param, "bad key!", 1)
                    step(f"long_key_{attempt}", synced, mlflow.log_param, "k" * 251, 1)
                    step(f"bad_tag_{attempt}", synced, mlflow.set_tag, "bad key!", 1)
                    step(f"bad_keys_{attempt}", synced, mlflow.log_params, {"ok": 1, "bad key!": 2})
                step("long_value", synced, mlflow.log_param, "long", "v" * 6001)
                step("edge_value", mlflow.log_param, "edge", "v" * 6000)
                read("tag_returns", repr(mlflow.set_tag("t", 1)))
                step("tag_changed", mlflow.set_tag, "t", 2)
                read("tags_returns", repr(mlflow.set_tags({"u": "v", "w": 2.5})))
                step("tags_empty", mlflow.set_tags, {})
                step("tag_long", synced, mlflow.set_tag, "long", "t" * 8001)
                step("note_tag", mlflow.set_tag, "mlflow.note.content", "a note")
                step("params_run_id", mlflow.log_params, {"given": 1}, run_id=outer.info.run_id)
                ops = mlflow.log_param("async", 1, synchronous=False)
                read("async_returns", type(ops).__name__)
                ops.wait()
                ops = mlflow.set_tags({"async_t": 1}, synchronous=False)
                read("async_tags_returns", type(ops).__name__)
                ops.wait()
                with mlflow.start_run(run_name="inner", nested=True) as inner:
                    note("inner", inner.info.run_id)
                    step("nested", mlflow.log_param, "depth", 2)
                    step("nested_tag", mlflow.set_tag, "level", "inner")
                step("after_nested", mlflow.set_tags, {"level": "outer"})

                step_in_thread("thread", mlflow.log_params, {"thread": 1})

                os.environ["MLFLOW_ENABLE_ASYNC_LOGGING"] = "true"
                read("env_async_returns", type(mlflow.set_tag("env_async", 1)).__name__)
                mlflow.flush_async_logging()
                del os.environ["MLFLOW_ENABLE_ASYNC_LOGGING"]

                uri = mlflow.get_tracking_uri()
                mlflow.set_tracking_uri("sqlite:///other.db")
                step("other_store", mlflow.log_param, "elsewhere", 1)
                mlflow.set_tracking_uri(uri)
                step("back", synced, mlflow.set_tag, "back", "yes")
            run = MlflowClient().get_run(outer.info.run_id)
            read("params", sorted((k, v[:20]) for k, v in run.data.params.items()))
            read("tags", sorted((k, v[:20]) for k, v in run.data.tags.items()
                                if k not in ("mlflow.runName", "mlflow.user")))
        step("script", body)
    ''',
    # MlflowClient.log_metric and log_batch (PyTorch Lightning's logger calls the latter) around
    # trackd's fast path: the forms it takes, those it leaves to MLflow (a timestamp of 0, which
    # the client keeps, bools, numpy, tuples, params in the batch, bad keys and run ids met
    # twice, async logging), and a client of another store beside it.
    "client_log_forms": '''
        import numpy as np
        def body():
            c = MlflowClient()
            exp = c.create_experiment("client-forms")
            rid = c.create_run(exp, run_name="c").info.run_id
            note("r", rid)
            read("metric_returns", repr(c.log_metric(rid, "m", 0.5, timestamp=TS0, step=1)))
            step("no_step", c.log_metric, rid, "m", 1, timestamp=TS0 + 1)
            step("ts_zero", c.log_metric, rid, "zero", 1.0, timestamp=0, step=2)
            step("positional", c.log_metric, rid, "m", 2.0, TS0 + 2, 3, True)
            step("big_int", c.log_metric, rid, "m", 10**20, timestamp=TS0 + 3, step=4)
            step("huge_int", synced, c.log_metric, rid, "m", 2**1100, timestamp=TS0, step=5)
            step("nan", c.log_metric, rid, "m", float("nan"), timestamp=TS0 + 4, step=6)
            step("bool", c.log_metric, rid, "m", True, timestamp=TS0 + 5, step=7)
            step("np", c.log_metric, rid, "m", np.float64(0.25), timestamp=TS0 + 6, step=8)
            step("neg_ts", synced, c.log_metric, rid, "m", 1.0, timestamp=-1, step=9)
            step("neg_step", c.log_metric, rid, "m", 1.0, timestamp=TS0 + 7, step=-3)
            for attempt in range(2):
                step(f"bad_key_{attempt}", synced, c.log_metric, rid, "bad key!", 1.0,
                     timestamp=TS0)
                step(f"bad_run_{attempt}", synced, c.log_metric, "not a run id!", "m", 1.0,
                     timestamp=TS0)
                step(f"unknown_run_{attempt}", synced, c.log_metric,
                     "0123456789abcdef0123456789abcdef", "m", 1.0, timestamp=TS0)
                step(f"batch_bad_key_{attempt}", synced, c.log_batch, rid,
                     metrics=[Metric("ok", 1.0, TS0, 0), Metric("bad key!", 1.0, TS0, 0)])
            read("batch_returns", repr(c.log_batch(rid, metrics=[Metric("b", i * 0.5, TS0 + i, i)
                                                                 for i in range(20)])))
            step("batch_ints", c.log_batch, rid,
                 metrics=[Metric("bi", 3, TS0, 0), Metric("bi", -7, TS0, 1)])
            step("batch_same_point", c.log_batch, rid,
                 metrics=[Metric("d", 1.0, TS0, 0), Metric("d", 1.0, TS0, 0)])
            step("batch_empty", c.log_batch, rid, metrics=[])
            step("batch_big", c.log_batch, rid,
                 metrics=[Metric("big", float(i), TS0, i) for i in range(2500)])
            step("batch_bool", c.log_batch, rid, metrics=[Metric("bb", True, TS0, 0)])
            step("batch_neg_ts", synced, c.log_batch, rid, metrics=[Metric("bt", 1.0, -5, 0)])
            step("batch_zero_ts", c.log_batch, rid, metrics=[Metric("bz", 1.0, 0, 0)])
            step("batch_tuple", c.log_batch, rid, metrics=(Metric("tu", 1.0, TS0, 0),))
            step("batch_params", c.log_batch, rid, metrics=[Metric("bp", 1.0, TS0, 0)],
                 params=[Param("q", 1)], tags=[RunTag("t", "x")])
            step("batch_nan", c.log_batch, rid, metrics=[Metric("bn", float("nan"), TS0, 0),
                                                         Metric("bn", float("-inf"), TS0, 1)])
            step("batch_positional", c.log_batch, rid, [Metric("pos", 1.0, TS0, 0)], [], [], True)
            ops = c.log_metric(rid, "async", 1.0, timestamp=TS0, synchronous=False)
            read("async_returns", type(ops).__name__)
            ops.wait()
            other = MlflowClient("sqlite:///other.db")
            orid = other.create_run(other.create_experiment("elsewhere")).info.run_id
            step("other_client", other.log_metric, orid, "m", 1.0, timestamp=TS0)
            step("other_batch", other.log_batch, orid, metrics=[Metric("m", 2.0, TS0, 1)])
            read("other_history", sorted((m.value, m.step) for m in
                                         other.get_metric_history(orid, "m")))
            c.set_terminated(rid, end_time=TS0 + 10)
            read("history", sorted((m.step, m.timestamp, m.value)  # NaN never compared
                                   for m in c.get_metric_history(rid, "m")))
        step("script", body)
    ''',
    # A block that raises: FAILED, the exception propagates unchanged.
    "block_raises": '''
        def body():
            mlflow.set_experiment("raises")
            with mlflow.start_run(run_name="x") as r:
                note("r", r.info.run_id)
                mlflow.log_metric("m", 1.0, step=0, timestamp=TS0)
                raise ValueError("diverged")
        step("script", body)
    ''',
}


def run_case(name, env, cwd, python=sys.executable):
    src = PRELUDE + textwrap.dedent(CASES[name]) + EPILOGUE
    cwd.mkdir(parents=True, exist_ok=True)
    (cwd / "case.py").write_text(src)
    p = subprocess.run([python, "case.py"], env=env, cwd=cwd, capture_output=True,
                       text=True, timeout=300)
    lines = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")]
    assert p.returncode == 0 and lines, f"{name} failed:\n{p.stdout[-3000:]}\n{p.stderr[-4000:]}"
    res = json.loads(lines[-1][len("RESULT "):])
    res["stderr"] = p.stderr  # not compared: shown when the outcomes differ
    return res


# MlflowClient.log_param appends this advice to the store's error at the call; a rejection
# that arrives at a barrier (trackd:, asynchronous) cannot carry it (README: what remains
# asynchronous).
PARAM_ADVICE = re.compile(r"\\n\\nThe cause of this error is typically.*?tracking store\.")


# Experiment ids come from each database's sequence; the trackd database serves every case.
EXPERIMENT_ID = re.compile(r"The experiment [0-9]+ ")


def normalise(obj, ids):
    text = PARAM_ADVICE.sub("", json.dumps(obj, sort_keys=True))
    text = EXPERIMENT_ID.sub("The experiment <id> ", text)
    for alias, run_id in ids.items():
        text = text.replace(run_id, f"<{alias}>")
    return json.loads(text)


# MLflow's generated run names (mlflow.utils.name_utils): adjective-noun-number.
RANDOM_NAME = re.compile(r"^[a-z]+-[a-z]+-[0-9]+$")


# Cases whose metrics MLflow stamps with the wall clock: their timestamps are not compared.
CLOCKED = {"sklearn_autolog", "fluent_log_metric_now"}


def rows(pg, db, ids, clocked=False):
    """What MLflow's tables hold for the case's runs, with ids replaced by aliases."""
    alias = {v: k for k, v in ids.items()}
    keys = list(ids.values())
    exps = {r[0]: r[1] for r in pg.query(db, "SELECT experiment_id, name FROM experiments")}
    ts = "0" if clocked else "timestamp"

    def q(sql):
        return sorted(tuple(alias.get(x, x) if isinstance(x, str) else x for x in r)
                      for r in pg.query(db, sql, (keys,)))

    out = {
        "experiments": sorted(pg.query(db, "SELECT name, lifecycle_stage FROM experiments")),
        "runs": sorted((alias[r[0]], RANDOM_NAME.sub("<random>", r[1]), r[2], r[3] is not None,
                        r[4], exps[r[5]])
                       for r in pg.query(db, "SELECT run_uuid, name, status, end_time,"
                                             " lifecycle_stage, experiment_id FROM runs"
                                             " WHERE run_uuid = ANY(%s)", (keys,))),
        "users": q("SELECT run_uuid, user_id FROM runs WHERE run_uuid = ANY(%s)"),
        "params": q("SELECT run_uuid, key, value FROM params WHERE run_uuid = ANY(%s)"),
        # mlflow.runName is compared through runs.name; a random one differs by design.
        "tags": q("SELECT run_uuid, key, value FROM tags WHERE run_uuid = ANY(%s)"
                  " AND key NOT IN ('mlflow.runName', 'mlflow.user')"),
        "metrics": q(f"SELECT run_uuid, key, value, {ts}, step, is_nan FROM metrics"
                     " WHERE run_uuid = ANY(%s) AND key <> 'never'"),
        "latest_metrics": q(f"SELECT run_uuid, key, value, {ts}, step, is_nan"
                            " FROM latest_metrics WHERE run_uuid = ANY(%s)"),
    }
    # MLflow 3's logged models; MLflow 2 has no such tables.
    if pg.query(db, "SELECT to_regclass('logged_models') IS NOT NULL")[0][0]:
        out["logged_model_metrics"] = q(f"SELECT run_id, metric_name, metric_value,"
                                        f" {ts.replace('timestamp', 'metric_timestamp_ms')},"
                                        " metric_step, dataset_name, dataset_digest"
                                        " FROM logged_model_metrics WHERE run_id = ANY(%s)")
        out["logged_models"] = q("SELECT source_run_id, name, status, lifecycle_stage"
                                 " FROM logged_models WHERE source_run_id = ANY(%s)")
    return out


@pytest.fixture(scope="module", params=RELEASES, ids=[r for r, _ in RELEASES])
def release(request, pg, artifact_root):
    """(release, python, new_db): the MLflow release a case runs with, and how to make a
    database that release made."""
    name, python = request.param
    if name == PINNED:
        return name, python, pg.mlflow_db
    return name, python, lambda db: release_db(pg, artifact_root, name, python, db)


@pytest.fixture(scope="module")
def default_agent(pg, tmp_path_factory, release):
    """An agent as a user starts it: the default configuration but for where it listens, the
    database, the journal, and the artifact roots the cases' own experiments use (their
    working directories and mlflow-artifacts:), which an operator allows in allowed_roots."""
    name, _, new_db = release
    db = new_db(f"semantics_trackd_{name.replace('.', '_')}")
    roots = f'[artifacts]\nallowed_roots = "{tmp_path_factory.getbasetemp()}, mlflow-artifacts:/"\n'
    a = Agent(pg, db, tmp_path_factory.mktemp("semantics") / "agent", artifact_root=None,
              extra=roots)
    a.start()
    yield a, db
    assert a.stop() == 0, a.log()[-3000:]


@pytest.mark.parametrize("case", sorted(CASES))
def test_case_behaves_as_mlflow(case, pg, release, default_agent, tmp_path):
    name, python, new_db = release
    if name != PINNED and case in NEEDS_FULL_MLFLOW:
        pytest.skip("needs scikit-learn and MLflow's model flavours: the pinned release only")
    agent, db_tr = default_agent
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "TRACKD_"))}
    db_ml = new_db(f"sem_{case}_{name.replace('.', '_')}"[:60])
    res_ml = run_case(case, dict(base, MLFLOW_TRACKING_URI=pg.url(db_ml)), tmp_path / "ml",
                      python)
    res_tr = run_case(case, dict(base, MLFLOW_TRACKING_URI=f"trackd://{agent.socket}",
                                 TRACKD_BACKEND_URI=pg.url(db_tr)), tmp_path / "tr", python)
    skip_steps, skip_keys = DRIVER_DEPENDENT.get(case, (set(), set())) if name != PINNED \
        else (set(), set())
    for res in (res_ml, res_tr):
        res["steps"] = [s for s in res["steps"] if s[0] not in skip_steps]
    seen_ml = normalise({k: res_ml[k] for k in ("steps", "read")}, res_ml["ids"])
    seen_tr = normalise({k: res_tr[k] for k in ("steps", "read")}, res_tr["ids"])
    differ = [(ml, tr) for ml, tr in zip(seen_ml["steps"], seen_tr["steps"]) if ml != tr]
    why = f"\nthe trackd run's stderr:\n{res_tr['stderr'][-4000:]}"
    assert not differ, "calls that differ (MLflow, trackd):\n" + "\n".join(map(repr, differ)) + why
    assert seen_tr == seen_ml, why
    rows_ml = rows(pg, db_ml, res_ml["ids"], case in CLOCKED)
    rows_tr = rows(pg, db_tr, res_tr["ids"], case in CLOCKED)
    for table in ("metrics", "latest_metrics"):
        for r in (rows_ml, rows_tr):
            r[table] = [row for row in r[table] if row[1] not in skip_keys]
    # The trackd database is shared by every case: compare only this case's experiments.
    names = {r[0] for r in rows_ml["experiments"]} - {"Default"}
    rows_tr["experiments"] = [r for r in rows_tr["experiments"] if r[0] in names]
    rows_ml["experiments"] = [r for r in rows_ml["experiments"] if r[0] in names]
    users_ml, users_tr = rows_ml.pop("users"), rows_tr.pop("users")
    assert {u for _, u in users_tr} <= {getpass.getuser()}, users_tr
    assert [a for a, _ in users_tr] == [a for a, _ in users_ml]
    for table in rows_ml:
        assert rows_tr[table] == rows_ml[table], table
    # No case leaves a run RUNNING.
    assert all(r[2] != "RUNNING" and r[3] for r in rows_tr["runs"]), rows_tr["runs"]
    print(f"\n{case}: {json.dumps(seen_ml['steps'])[:300]}")


OUTAGE_SCRIPT = textwrap.dedent('''
    import sys
    import mlflow
    mlflow.set_experiment("outage")
    try:
        with mlflow.start_run(run_name="o") as r:
            print(r.info.run_id, flush=True)
            mlflow.log_metric("m", 1.0, step=0, timestamp=1_700_000_000_000)
            sys.stdin.readline()  # the test stops the database now
            mlflow.log_metric("m", 2.0, step=1, timestamp=1_700_000_000_001)
    except Exception as e:
        print(type(e).__name__, str(e).split(";")[0], flush=True)
''')


def test_run_ends_after_an_outage_longer_than_the_exit_barrier(pg, release, default_agent,
                                                               tmp_path):
    """The database goes down inside the block, with a point still to write when the block
    ends, and stays down past the store's barrier: the script gets the barrier's error, and
    the run still ends FINISHED, with its end time, as soon as the database is back (the end
    event was sent before any barrier)."""
    if release[0] != PINNED:
        pytest.skip("the plugin's barrier is the same code for every release: pinned only")
    agent, db = default_agent
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "TRACKD_"))}
    (tmp_path / "o.py").write_text(OUTAGE_SCRIPT)
    env = dict(base, MLFLOW_TRACKING_URI=f"trackd://{agent.socket}",
               TRACKD_BACKEND_URI=pg.url(db), TRACKD_FLUSH_TIMEOUT="2")
    p = subprocess.Popen([sys.executable, "o.py"], env=env, cwd=tmp_path, text=True,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    run_id = p.stdout.readline().strip()
    assert re.fullmatch(r"[0-9a-f]{32}", run_id), (run_id, p.stderr.read()[-2000:])
    # The run is in the database before the outage: only its end is left to write.
    wait_for(lambda: pg.query(db, "SELECT status FROM runs WHERE run_uuid = %s", (run_id,)), 30,
             "the run to be written")
    pg.pause()
    try:
        out, err = p.communicate("go\n", timeout=120)
        assert p.returncode == 0, err[-3000:]
        assert out.startswith("MlflowException trackd: the agent did not commit this process's "
                              "writes within 2 s"), (out, err[-2000:])
    finally:
        pg.resume()
    row = wait_for(lambda: pg.query(db, "SELECT status, end_time IS NOT NULL FROM runs"
                                        " WHERE run_uuid = %s AND status <> 'RUNNING'",
                                    (run_id,)), 60, "the run's end to be written")
    assert row == [("FINISHED", True)]
    assert pg.query(db, "SELECT value FROM metrics WHERE run_uuid = %s ORDER BY step",
                    (run_id,)) == [(1.0,), (2.0,)]
