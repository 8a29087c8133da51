"""Logs a realistic history into an MLflow local store with the pinned MLflow itself, for
`trackd import` to move: `python mlflow_history.py URI` with URI file:///…/mlruns or
sqlite:///…/mlflow.db (run in a scratch directory: artifacts go under ./mlruns there).

It holds what real stores hold: nested runs, NaN and +-Inf, the same point logged twice, a
metric logged with a dataset, a failed and a deleted run, a deleted experiment, a logged model
with its own params, tags and metrics, registered model versions with aliases, tags and a
stage, artifacts, and a trace (which the import counts but does not move). It prints a JSON
line with the ids a test needs.
"""
import json
import os
import sys

os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"

import mlflow  # noqa: E402
import pandas as pd  # noqa: E402
from mlflow import MlflowClient  # noqa: E402
from mlflow.entities import (LoggedModelInput, LoggedModelOutput, Metric, Param,  # noqa: E402
                             RunTag)

uri = sys.argv[1]
mlflow.set_tracking_uri(uri)
mlflow.set_registry_uri(uri)
c = MlflowClient()

exp = c.create_experiment("vision", tags={"team": "perception", "empty": "", "a/b": "nested"})
mlflow.set_experiment(experiment_id=exp)
ds = mlflow.data.from_pandas(pd.DataFrame({"x": [1, 2, 3]}), name="train-set")
with mlflow.start_run(run_name="sweep") as parent:
    mlflow.log_params({"optimizer": "adam", "empty": "", "dir/param": "x"})
    mlflow.set_tags({"stage": "sweep", "note": "None"})
    mlflow.log_text("hello", "notes/readme.txt")
    for lr in ("0.1", "0.01"):
        with mlflow.start_run(run_name=f"lr={lr}", nested=True) as child:
            mlflow.log_param("lr", lr)
            for step in range(50):
                mlflow.log_metric("loss", 1.0 / (step + 1) + float(lr), step=step,
                                  timestamp=1_700_000_000_000 + step)
            mlflow.log_metric("val/loss", 0.5, step=3, timestamp=1_700_000_000_100)
    rid = parent.info.run_id
    c.log_metric(rid, "odd", 1.5, timestamp=1000, step=0)
    c.log_metric(rid, "odd", 1.5, timestamp=1000, step=0)  # the same point twice
    c.log_metric(rid, "odd", float("nan"), timestamp=1001, step=1)
    c.log_metric(rid, "odd", float("inf"), timestamp=1002, step=2)
    c.log_metric(rid, "odd", -float("inf"), timestamp=1003, step=3)
    c.log_metric(rid, "odd", 2.0, timestamp=999, step=3)
    c.log_metric(rid, "only_nan", float("nan"), timestamp=1005, step=0)
    c.log_batch(rid, metrics=[Metric("batch", i * 0.25, 2000 + i, i) for i in range(300)],
                params=[Param("batch_size", "64")], tags=[RunTag("batched", "yes")])
    mlflow.log_input(ds, context="training")
    model = mlflow.initialize_logged_model(name="classifier", params={"depth": "3"},
                                           tags={"framework": "none"})
    mlflow.log_metric("acc", 0.9, step=7, timestamp=1_700_000_000_500, model_id=model.model_id,
                      dataset=ds)
    mlflow.log_metric("acc", 0.95, step=8, timestamp=1_700_000_000_600, model_id=model.model_id)
    with open("weights.txt", "w") as f:
        f.write("0.5 0.25")
    c.log_model_artifact(model.model_id, "weights.txt")
    mlflow.finalize_logged_model(model.model_id, "READY")
    c.log_outputs(rid, [LoggedModelOutput(model.model_id, 8)])
    c.log_inputs(rid, models=[LoggedModelInput(model.model_id)])

failed = c.create_run(exp, run_name="crashed", start_time=1_700_000_001_000)
c.log_metric(failed.info.run_id, "loss", 3.0, timestamp=1_700_000_001_001, step=0)
c.set_terminated(failed.info.run_id, "FAILED", end_time=1_700_000_002_000)
gone = c.create_run(exp, run_name="deleted-run")
c.log_param(gone.info.run_id, "p", "1")
c.delete_run(gone.info.run_id)

default_run = c.create_run("0", run_name="in-default")
c.log_metric(default_run.info.run_id, "x", 1.0, timestamp=5, step=0)
c.set_terminated(default_run.info.run_id)

old = c.create_experiment("abandoned")
old_run = c.create_run(old, run_name="before-deletion")
c.log_metric(old_run.info.run_id, "m", 1.0, timestamp=10, step=0)
c.delete_experiment(old)

c.create_registered_model("classifier", tags={"owner": "ml"}, description="the classifier")
v1 = c.create_model_version("classifier", source=f"runs:/{rid}/model", run_id=rid,
                            tags={"validated": "yes"}, description="first")
v2 = c.create_model_version("classifier", source=f"runs:/{rid}/model2", run_id=rid)
v3 = c.create_model_version("classifier", source=f"runs:/{rid}/model3", run_id=rid)
c.set_registered_model_alias("classifier", "champion", v1.version)
c.set_registered_model_alias("classifier", "challenger", v2.version)
c.transition_model_version_stage("classifier", v1.version, "Staging")
c.delete_model_version("classifier", v3.version)


@mlflow.trace
def predict(x):
    return x + 1


predict(1)
print(json.dumps({"experiment": exp, "parent": rid, "failed": failed.info.run_id,
                  "deleted": gone.info.run_id, "abandoned": old, "model": model.model_id}))
