"""`trackd import`: an MLflow file store and a SQLite store, each made by the pinned MLflow
with a realistic history (mlflow_history.py), moved into PostgreSQL and read back with
MLflow's own client. What MLflow's client reads from PostgreSQL must be what it reads from
the source, apart from the rules of MLflow's SQL store, each named where it applies.

The command is the user's: build/trackd import with a configuration that names only the
database, and the Python of the test's environment first on PATH, as an activated venv puts it.
"""
import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from harness import BUILD, wait_for

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(autouse=True)
def scratch_cwd(tmp_path, monkeypatch):
    """MLflow's client opens ./mlflow.db, its default store, for some reads: not in the tree."""
    monkeypatch.chdir(tmp_path)

MAX = 1.7976931348623157e308
HISTORY = Path(__file__).with_name("mlflow_history.py")
# The tables the import writes, in an order that makes every dump comparable.
TABLES = {
    "experiments": "name, artifact_location, lifecycle_stage, creation_time, last_update_time",
    "experiment_tags": "(SELECT name FROM experiments e WHERE e.experiment_id = t.experiment_id),"
                       " key, value",
    "runs": "run_uuid, name, source_type, user_id, status, start_time, end_time, deleted_time,"
            " lifecycle_stage, artifact_uri,"
            " (SELECT name FROM experiments e WHERE e.experiment_id = t.experiment_id)",
    "params": "run_uuid, key, value",
    "tags": "run_uuid, key, value",
    "metrics": "run_uuid, key, timestamp, step, value, is_nan",
    "latest_metrics": "run_uuid, key, timestamp, step, value, is_nan",
    "datasets": "name, digest, dataset_source_type",
    "inputs": "source_type, destination_type, step",
    "logged_models": "model_id, name, status, lifecycle_stage, source_run_id",
    "logged_model_metrics": "model_id, metric_name, metric_timestamp_ms, metric_step,"
                            " metric_value, run_id, dataset_name",
    "registered_models": "name, description",
    "model_versions": "name, version, current_stage, source, run_id",
    "registered_model_aliases": "name, alias, version",
}


def dump(pg, db):
    """Every imported table's rows, experiment ids replaced by names, sorted."""
    return {t: sorted(pg.query(db, f"SELECT {cols} FROM {t} t"), key=repr)
            for t, cols in TABLES.items()}


def make_store(where: Path, uri: str) -> dict:
    where.mkdir(parents=True, exist_ok=True)
    out = subprocess.run([sys.executable, str(HISTORY), uri], cwd=where, check=True,
                         capture_output=True, text=True,
                         env={**os.environ, "MLFLOW_ALLOW_FILE_STORE": "true"})
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    base = tmp_path_factory.mktemp("stores")
    fs = make_store(base / "fs", f"file://{base}/fs/mlruns")
    sq = make_store(base / "sq", f"sqlite:///{base}/sq/mlflow.db")
    return {"file": (str(base / "fs" / "mlruns"), fs),
            "sqlite": (f"sqlite:///{base}/sq/mlflow.db", sq), "base": base}


def trackd_import(pg, db, tmp_path, *args, env=None, config=True, extra="", **popen):
    """Runs `trackd import ARGS` as a user would, with a configuration naming db (and the
    TOML text extra after it)."""
    cfg = tmp_path / "import.toml"
    cfg.write_text(f'[postgres]\ndsn = "{pg.dsn(db)}"\n{extra}')
    e = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
         **(env or {})}
    cmd = [str(BUILD / "trackd"), "import", *map(str, args)]
    if config:
        cmd += ["--config", str(cfg)]
    if popen:
        return subprocess.Popen(cmd, env=e, text=True, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, **popen)
    return subprocess.run(cmd, env=e, text=True, capture_output=True, timeout=600)


def counted(out: str, what: str) -> int:
    """A count from the final summary; 0 when the summary does not list it."""
    for line in out.splitlines():
        head, _, n = line.strip().rpartition(" ")
        if head.strip() == what:
            return int(n.replace(",", ""))
    return 0


def norm(v):
    """A metric value as MLflow's SQL store gives it back: NaN is NaN, +-Inf is +-MAX."""
    if math.isnan(v):
        return "nan"
    return MAX if v == math.inf else -MAX if v == -math.inf else v


def snapshot(uri: str, skip_history=()) -> dict:
    """What MLflow's client reads from a store: experiments, runs with every field a user
    sees, metric histories, inputs, artifact listings, logged models and the registry."""
    from mlflow import MlflowClient
    from mlflow.entities import ViewType

    c = MlflowClient(tracking_uri=uri, registry_uri=uri)
    out = {"experiments": {}, "runs": {}, "models": {}, "registry": {}}
    for e in c.search_experiments(view_type=ViewType.ALL):
        rec = {"stage": e.lifecycle_stage, "tags": dict(e.tags)}
        if e.name != "Default":  # merged into the target's own Default experiment
            rec.update(location=e.artifact_location, created=e.creation_time,
                       updated=e.last_update_time)
        out["experiments"][e.name] = rec
        for r in c.search_runs([e.experiment_id], run_view_type=ViewType.ALL, max_results=1000):
            i = r.info
            g = c.get_run(i.run_id)
            hist = {k: sorted({(m.step, m.timestamp, norm(m.value))
                               for m in c.get_metric_history(i.run_id, k)}, key=repr)
                    for k in r.data.metrics if k not in skip_history}
            out["runs"][i.run_id] = {
                "experiment": e.name, "name": i.run_name, "status": i.status,
                "start": i.start_time, "end": i.end_time, "stage": i.lifecycle_stage,
                "artifact_uri": i.artifact_uri, "user": i.user_id, "params": r.data.params,
                "tags": r.data.tags, "history": hist,
                "latest": {k: norm(v) for k, v in r.data.metrics.items()},
                "inputs": sorted((d.dataset.name, d.dataset.digest, d.dataset.source_type,
                                  sorted((t.key, t.value) for t in d.tags))
                                 for d in r.inputs.dataset_inputs),
                # MLflow's SQL store fills a run's models in get_run only, not in search_runs.
                "model_inputs": sorted(m.model_id for m in g.inputs.model_inputs or []),
                "model_outputs": sorted((m.model_id, m.step)
                                        for m in (g.outputs.model_outputs if g.outputs else [])),
                "artifacts": sorted((f.path, f.is_dir, f.file_size)
                                    for f in c.list_artifacts(i.run_id))}
        for m in c.search_logged_models(experiment_ids=[e.experiment_id]):
            out["models"][m.model_id] = {
                "experiment": e.name, "name": m.name, "status": str(m.status),
                "run": m.source_run_id, "params": m.params, "tags": m.tags,
                "metrics": sorted((x.key, norm(x.value), x.timestamp, x.run_id)
                                  for x in m.metrics or [])}
    for rm in c.search_registered_models():
        versions = c.search_model_versions(f"name = '{rm.name}'")
        out["registry"][rm.name] = {
            "description": rm.description, "tags": rm.tags,
            "aliases": sorted((a, str(v)) for a, v in rm.aliases.items()),
            "versions": sorted((v.version, v.current_stage, v.source, v.run_id, v.status,
                                v.description, sorted(v.tags.items())) for v in versions)}
    return out


def test_file_store_reads_back_as_mlflow_reads_it(pg, db, tmp_path, stores, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    source, ids = stores["file"]
    r = trackd_import(pg, db, tmp_path, source, "--no-progress")
    assert r.returncode == 0, r.stderr
    # MLflow's file store reads a point logged with a dataset back at step 0 (its reader
    # takes the step only from 3-field lines); the step logged, and imported, is 7.
    want = snapshot("file://" + source, skip_history={"acc"})
    got = snapshot(pg.url(db), skip_history={"acc"})
    assert got == want
    assert pg.query(db, "SELECT step, value FROM metrics WHERE run_uuid = %s AND key = 'acc' "
                    "ORDER BY step", [ids["parent"]]) == [(7, 0.9), (8, 0.95)]
    # MLflow's SQL rules: the same point logged twice is one row; NaN is 0 with is_nan.
    assert pg.query(db, "SELECT timestamp, step, value, is_nan FROM metrics WHERE run_uuid = %s"
                    " AND key = 'odd' ORDER BY step, timestamp", [ids["parent"]]) == [
        (1000, 0, 1.5, False), (1001, 1, 0.0, True), (1002, 2, MAX, False),
        (999, 3, 2.0, False), (1003, 3, -MAX, False)]
    assert pg.query(db, "SELECT timestamp, step, value, is_nan FROM latest_metrics "
                    "WHERE run_uuid = %s AND key IN ('odd', 'only_nan') ORDER BY key",
                    [ids["parent"]]) == [(1003, 3, -MAX, False), (1005, 0, 0.0, True)]
    # The deleted run and the deleted experiment keep their lifecycle, as MLflow keeps them.
    assert pg.query(db, "SELECT lifecycle_stage, deleted_time IS NOT NULL FROM runs "
                    "WHERE run_uuid = %s", [ids["deleted"]]) == [("deleted", True)]
    assert got["experiments"]["abandoned"]["stage"] == "deleted"
    assert counted(r.stdout, "runs imported") == 7
    assert counted(r.stdout, "metric points duplicated in the source, kept once") == 1
    assert counted(r.stdout, "traces not imported") == 1
    assert counted(r.stdout, "model versions imported") == 3
    # File-store experiment ids are 18 digits: every one is re-assigned, references follow.
    assert max(e for (e,) in pg.query(db, "SELECT experiment_id FROM experiments")) < 10
    assert pg.query(db, "SELECT count(*) FROM runs r JOIN experiments e USING (experiment_id)"
                    " WHERE e.name = 'vision'") == [(5,)]


def test_sqlite_store_reads_back_as_mlflow_reads_it(pg, db, tmp_path, stores):
    source, ids = stores["sqlite"]
    r = trackd_import(pg, db, tmp_path, source, "--no-progress")
    assert r.returncode == 0, r.stderr
    assert snapshot(pg.url(db)) == snapshot(source)
    assert counted(r.stdout, "runs imported") == 7
    assert counted(r.stdout, "traces not imported") == 1
    # Free ids that fit are kept; the sequence moves past them for MLflow's next experiment.
    assert pg.query(db, "SELECT experiment_id, name FROM experiments ORDER BY 1") == [
        (0, "Default"), (1, "vision"), (2, "abandoned")]
    from mlflow import MlflowClient
    assert MlflowClient(tracking_uri=pg.url(db)).create_experiment("next") == "3"


def test_import_again_changes_nothing(pg, db, tmp_path, stores):
    source, _ = stores["file"]
    first = trackd_import(pg, db, tmp_path, source)
    assert first.returncode == 0, first.stderr
    before = dump(pg, db)
    # The form of the source a tracking URI has, and --config=FILE.
    again = trackd_import(pg, db, tmp_path, "file://" + source,
                          f"--config={tmp_path / 'import.toml'}", config=False)
    assert again.returncode == 0, again.stderr
    assert dump(pg, db) == before
    assert counted(again.stdout, "runs already present") == 7
    assert counted(again.stdout, "runs imported") == 0
    assert counted(again.stdout, "logged models already present") == 1
    assert counted(again.stdout, "registered models already present") == 1


def tree(root: Path) -> dict:
    """Every file below root: relative path -> bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def local(uri: str) -> Path:
    return Path(uri[len("file://"):] if uri.startswith("file://") else uri)


def test_copy_artifacts_puts_them_under_the_agents_root(pg, db, tmp_path, stores,
                                                        monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    source, ids = stores["file"]
    root = tmp_path / "artifact-root"
    extra = f'[mlflow]\ndefault_artifact_root = "{root}"\n'
    want = snapshot("file://" + source, skip_history={"acc"})
    dry = trackd_import(pg, db, tmp_path, source, "--copy-artifacts", "--dry-run", extra=extra)
    assert dry.returncode == 0, dry.stderr
    assert counted(dry.stdout, "runs imported") == 7
    assert not root.exists() and pg.query(db, "SELECT count(*) FROM runs") == [(0,)]
    r = trackd_import(pg, db, tmp_path, source, "--copy-artifacts", "--no-progress",
                      extra=extra)
    assert r.returncode == 0, r.stderr
    got = snapshot(pg.url(db), skip_history={"acc"})
    # Every run now lives where the agent puts a run of its experiment, with the same files.
    exps = dict(pg.query(db, "SELECT name, artifact_location FROM experiments"))
    for name in ("vision", "abandoned"):
        (eid,), = pg.query(db, "SELECT experiment_id FROM experiments WHERE name = %s", [name])
        assert exps[name] == f"{root}/{eid}"
        assert got["experiments"][name].pop("location") == exps[name]
        want["experiments"][name].pop("location")
    copied = 0
    for rid, run in got["runs"].items():
        old = want["runs"][rid].pop("artifact_uri")
        assert run.pop("artifact_uri") == f"{exps[run['experiment']]}/{rid}/artifacts"
        files = tree(local(old))
        assert tree(local(f"{exps[run['experiment']]}/{rid}/artifacts")) == files
        copied += len(files)
    assert got == want  # listings included: MLflow's client reads the copies
    # The logged model's files moved too.
    (eid,), = pg.query(db, "SELECT experiment_id FROM experiments WHERE name = 'vision'")
    (model_at,), = pg.query(db, "SELECT artifact_location FROM logged_models")
    assert model_at == f"{root}/{eid}/models/{ids['model']}/artifacts"
    from mlflow import MlflowClient
    old_model = MlflowClient(tracking_uri="file://" + source).get_logged_model(ids["model"])
    assert tree(local(model_at)) == tree(local(old_model.artifact_location)) == {
        "weights.txt": b"0.5 0.25"}
    assert counted(r.stdout, "artifact files copied") == copied + 1
    assert counted(r.stdout, "artifact bytes copied") == len(b"hello") + len(b"0.5 0.25")
    # A version from runs:/ keeps it as its storage location (MLflow resolves it on reads).
    locations = pg.query(db, "SELECT source, storage_location FROM model_versions "
                         "ORDER BY version")
    assert [s for s, _ in locations] == [f"runs:/{ids['parent']}/model{n}" for n in ("", 2, 3)]
    assert [loc for _, loc in locations] == [s for s, _ in locations]
    # Again: the same rows, nothing copied, nothing reported.
    before = dump(pg, db)
    again = trackd_import(pg, db, tmp_path, source, "--copy-artifacts", extra=extra)
    assert again.returncode == 0, again.stderr
    assert dump(pg, db) == before
    assert counted(again.stdout, "runs already present") == 7
    assert counted(again.stdout, "artifact files copied") == 0
    # A store imported before without the option: nothing can move, and the command says so.
    db2 = pg.mlflow_db(db + "_plain")
    assert trackd_import(pg, db2, tmp_path, source).returncode == 0
    late = trackd_import(pg, db2, tmp_path, source, "--copy-artifacts", extra=extra)
    assert late.returncode == 1
    assert "experiment 'vision'" in late.stderr
    assert "(an import without --copy-artifacts made it): its runs' files are not copied" in \
        late.stderr
    assert counted(late.stdout, "experiments whose runs' files stay where they are") == 2
    assert counted(late.stdout, "artifact files copied") == 0


@pytest.mark.parametrize("kind", ["file", "sqlite"])
def test_copy_artifacts_of_a_moved_store_and_failed_copies(pg, db, tmp_path, kind):
    # A store copied from another machine: its recorded locations name paths that are gone;
    # the files are where MLflow keeps them beside the store.
    made = make_store_small(tmp_path / "elsewhere", kind)
    moved = tmp_path / "here"
    (tmp_path / "elsewhere").rename(moved)
    source = moved / "mlruns" if kind == "file" else f"sqlite:///{moved}/mlflow.db"
    root = tmp_path / "root"
    extra = f'[mlflow]\ndefault_artifact_root = "file://{root}"\n'
    r = trackd_import(pg, db, tmp_path, source, "--copy-artifacts", "--no-progress",
                      extra=extra)
    assert r.returncode == 0, r.stderr
    # A file store's 18-digit ids are re-assigned in the order they are read: ask.
    (uri, eid), = pg.query(db, "SELECT artifact_uri, experiment_id FROM runs WHERE "
                           "run_uuid = %s", [made["run"]])
    assert uri == f"file://{root}/{eid}/{made['run']}/artifacts"
    assert tree(local(uri)) == {"ckpt/weights.bin": bytes(range(256)) * 64}
    # A model version registered from the run's files by path names the copy.
    assert pg.query(db, "SELECT source, storage_location FROM model_versions") == [
        (f"{uri}/ckpt", f"{uri}/ckpt")]
    # A run whose recorded location, outside the store, is not here (a share not mounted)
    # keeps it, named and counted.
    (kept,), = pg.query(db, "SELECT artifact_uri FROM runs WHERE run_uuid = %s",
                        [made["empty"]])
    assert kept == made["empty_uri"] and "/elsewhere/" in kept
    assert f"nothing at its recorded location {kept}" in r.stderr
    assert counted(r.stdout, "artifact locations not found here, kept as recorded") == 1
    again = trackd_import(pg, db, tmp_path, source, "--copy-artifacts", extra=extra)
    assert again.returncode == 0, again.stderr
    assert counted(again.stdout, "runs already present") == 2

    # One run's copy fails (a file where its directory must go: so even for root): that run
    # is refused with both locations named (the files found beside the store), nothing of it
    # is written, the registered model that names its files waits, and the same command once
    # the cause is gone imports both.
    db2 = pg.mlflow_db(db + "_2")
    root2 = tmp_path / "root2"
    for n in (1, 2):  # the experiment's id to come
        (root2 / str(n)).mkdir(parents=True)
        (root2 / str(n) / made["run"]).write_text("in the way")
    extra2 = f'[mlflow]\ndefault_artifact_root = "{root2}"\n'
    bad = trackd_import(pg, db2, tmp_path, source, "--copy-artifacts", "--no-progress",
                        extra=extra2)
    assert bad.returncode == 1
    (eid,), = pg.query(db2, "SELECT experiment_id FROM experiments WHERE name = 'moved'")
    assert (f"its artifacts could not be copied from {moved}/mlruns/{made['experiment']}/"
            f"{made['run']}/artifacts to {root2}/{eid}/{made['run']}/artifacts: ") in bad.stderr
    assert "registered model 'weights'" in bad.stderr
    assert counted(bad.stdout, "runs refused") == 1
    assert counted(bad.stdout, "registered models refused") == 1
    assert pg.query(db2, "SELECT (SELECT count(*) FROM runs WHERE run_uuid = %s), "
                    "(SELECT count(*) FROM model_versions)", [made["run"]]) == [(0, 0)]
    for n in (1, 2):
        (root2 / str(n) / made["run"]).unlink()
    good = trackd_import(pg, db2, tmp_path, source, "--copy-artifacts", "--no-progress",
                         extra=extra2)
    assert good.returncode == 0, good.stderr
    assert counted(good.stdout, "runs imported") == 1
    copy = root2 / str(eid) / made["run"] / "artifacts"
    assert tree(copy) == {"ckpt/weights.bin": bytes(range(256)) * 64}
    assert pg.query(db2, "SELECT storage_location FROM model_versions") == [(f"{copy}/ckpt",)]

    # A root that cannot be written is refused before anything is written.
    db3 = pg.mlflow_db(db + "_3")
    blocker = tmp_path / "blocker"
    blocker.write_text("not a directory")
    no = trackd_import(pg, db3, tmp_path, source, "--copy-artifacts",
                       extra=f'[mlflow]\ndefault_artifact_root = "{blocker}/root"\n')
    assert no.returncode == 1
    assert f"cannot write to the artifact root {blocker}/root: Not a directory" in no.stderr
    assert pg.query(db3, "SELECT count(*) FROM experiments") == [(1,)]


def make_store_small(where: Path, kind: str) -> dict:
    """A file or SQLite store in where (its artifacts in where/mlruns) with a run that has
    one binary artifact in a subdirectory and a model version registered from it by path,
    and a run without files in an experiment whose location is outside the store."""
    where.mkdir(parents=True)
    uri = f"file://{where}/mlruns" if kind == "file" else f"sqlite:///{where}/mlflow.db"
    script = (
        "import mlflow, os, sys, json\n"
        "mlflow.set_tracking_uri(sys.argv[1])\n"
        "e = mlflow.create_experiment('moved')\n"
        "with mlflow.start_run(experiment_id=e) as r:\n"
        "    mlflow.log_metric('m', 1.0)\n"
        "    os.makedirs('w', exist_ok=True)\n"
        "    open('w/weights.bin', 'wb').write(bytes(range(256)) * 64)\n"
        "    mlflow.log_artifact('w/weights.bin', 'ckpt')\n"
        "share = mlflow.create_experiment('shared', artifact_location=sys.argv[2])\n"
        "with mlflow.start_run(experiment_id=share) as empty:\n"
        "    mlflow.log_metric('m', 2.0)\n"
        "c = mlflow.MlflowClient(registry_uri=sys.argv[1])\n"
        "c.create_registered_model('weights')\n"
        "c.create_model_version('weights', r.info.artifact_uri + '/ckpt', r.info.run_id)\n"
        "print(json.dumps({'run': r.info.run_id, 'experiment': e, 'empty': empty.info.run_id,"
        " 'empty_uri': empty.info.artifact_uri}))\n")
    share = f"file://{where}/share/projects"  # its runs' files: elsewhere, on a share
    out = subprocess.run([sys.executable, "-c", script, uri, share], cwd=where, check=True,
                         capture_output=True, text=True,
                         env={**os.environ, "MLFLOW_ALLOW_FILE_STORE": "true"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_taken_experiment_ids_are_reassigned_and_references_follow(pg, db, tmp_path, stores):
    from mlflow import MlflowClient
    c = MlflowClient(tracking_uri=pg.url(db))
    assert c.create_experiment("someone else's") == "1"
    mine = c.create_experiment("vision")  # the same name as the source's: merged into it
    source, ids = stores["sqlite"]
    r = trackd_import(pg, db, tmp_path, source, "--no-progress")
    assert r.returncode == 0, r.stderr
    assert counted(r.stdout, "experiments merged into an existing one") == 2  # Default, vision
    # "abandoned" was id 2 in the source: taken by "vision" here, so it gets the next id.
    (abandoned,), = pg.query(db, "SELECT experiment_id FROM experiments WHERE name = "
                             "'abandoned'")
    assert abandoned not in (0, 1, int(mine))
    assert pg.query(db, "SELECT experiment_id FROM runs WHERE run_uuid = %s",
                    [ids["parent"]]) == [(int(mine),)]
    for table in ("datasets", "logged_models", "logged_model_metrics", "logged_model_params"):
        assert pg.query(db, f"SELECT DISTINCT experiment_id FROM {table}") == [(int(mine),)]
    assert [r.info.run_id for r in c.search_runs([mine], filter_string="attributes.run_name = "
                                                 "'sweep'")] == [ids["parent"]]


def test_a_run_that_differs_is_reported_and_left(pg, db, tmp_path, stores):
    source, ids = stores["file"]
    assert trackd_import(pg, db, tmp_path, source).returncode == 0
    pg.query(db, "UPDATE params SET value = 'sgd' WHERE run_uuid = %s AND key = 'optimizer' "
             "RETURNING 1", [ids["parent"]])
    pg.query(db, "UPDATE model_versions SET source = 'elsewhere' WHERE version = 2 "
             "RETURNING 1")
    r = trackd_import(pg, db, tmp_path, source)
    assert r.returncode == 1
    assert f"run {ids['parent']}" in r.stderr and "other data (params)" in r.stderr
    assert ("registered model 'classifier'" in r.stderr
            and "other data (model_versions); left as it is" in r.stderr), r.stderr
    assert "2 entities need a look" in r.stderr
    assert counted(r.stdout, "runs already present") == 6
    assert pg.query(db, "SELECT value FROM params WHERE run_uuid = %s AND key = 'optimizer'",
                    [ids["parent"]]) == [("sgd",)]
    assert pg.query(db, "SELECT source FROM model_versions WHERE version = 2") == [
        ("elsewhere",)]


def test_an_experiment_deleted_in_the_target_is_named(pg, db, tmp_path, stores):
    from mlflow import MlflowClient
    c = MlflowClient(tracking_uri=pg.url(db))
    eid = c.create_experiment("vision")
    c.delete_experiment(eid)
    r = trackd_import(pg, db, tmp_path, stores["sqlite"][0])
    assert r.returncode == 1
    assert ("the target's experiment of that name (id 1) is deleted" in r.stderr
            and "mlflow experiments restore --experiment-id 1" in r.stderr), r.stderr
    assert pg.query(db, "SELECT count(*) FROM runs WHERE experiment_id = 1") == [(5,)]


def test_usage_errors_say_what_to_do(pg, db, tmp_path, stores):
    r = trackd_import(pg, db, tmp_path, stores["file"][0], "--jobs", "0")
    assert r.returncode == 2 and "--jobs: must be at least 1, not 0" in r.stderr
    r = trackd_import(pg, db, tmp_path, stores["file"][0], "--artifact-root", tmp_path)
    assert r.returncode == 2
    assert "--artifact-root is where --copy-artifacts copies to: give both" in r.stderr
    # mlflow-artifacts: needs the server that stores them, before anything is read.
    r = trackd_import(pg, db, tmp_path, stores["file"][0], "--copy-artifacts",
                      extra='[mlflow]\ndefault_artifact_root = "mlflow-artifacts:/"\n')
    assert r.returncode == 1
    assert ("the artifact root mlflow-artifacts:/ names an MLflow server's artifact proxy: set "
            "[artifacts] mlflow_server_url to that server's URL") in r.stderr
    # MLflow >= 3.7 logs into ./mlflow.db and keeps only artifacts in ./mlruns.
    artifacts_only = stores["base"] / "sq" / "mlruns"
    r = trackd_import(pg, db, tmp_path, artifacts_only)
    assert r.returncode == 1
    assert ("looks like the artifact directory of a SQLite store" in r.stderr and
            f"trackd import sqlite:///{stores['base'] / 'sq' / 'mlflow.db'}" in r.stderr), r.stderr
    assert pg.query(db, "SELECT count(*) FROM experiments") == [(1,)]


def test_bad_input_is_reported_and_the_rest_imported(pg, db, tmp_path, stores):
    src = tmp_path / "mlruns"
    shutil.copytree(stores["file"][0], src)
    _, ids = stores["file"]
    run_dir = next(src.glob(f"*/{ids['parent']}"))
    with open(run_dir / "metrics" / "odd", "a") as f:
        # What MLflow's client writes for step=1.0 (taken, as MLflow meant it), a fractional
        # timestamp and a line cut short by a crash (both skipped and counted).
        f.write("1010 4.0 4.0\n1000.5 4.0 5\n1011")
    failed_dir = next(src.glob(f"*/{ids['failed']}"))
    meta = yaml.safe_load((failed_dir / "meta.yaml").read_text())
    meta["artifact_uri"] = "file:///" + "x" * 250
    (failed_dir / "meta.yaml").write_text(yaml.safe_dump(meta))
    r = trackd_import(pg, db, tmp_path, src, "--no-progress")
    assert r.returncode == 1
    assert (f"refused run {ids['failed']}" in r.stderr
            and "runs.artifact_uri is 258 characters long; PostgreSQL's column holds 200"
            in r.stderr), r.stderr
    assert "skipped unreadable metric line" in r.stderr and "'1000.5 4.0 5'" in r.stderr
    assert counted(r.stdout, "metric lines unreadable") == 2
    assert counted(r.stdout, "runs refused") == 1
    assert counted(r.stdout, "runs imported") == 6
    assert pg.query(db, "SELECT count(*) FROM runs WHERE run_uuid = %s", [ids["failed"]]) == [(0,)]
    assert pg.query(db, "SELECT value FROM metrics WHERE run_uuid = %s AND key = 'odd' AND "
                    "step = 4", [ids["parent"]]) == [(4.0,)]


def test_sqlite_store_of_another_revision_is_refused(pg, db, tmp_path, stores):
    import sqlite3
    copy = tmp_path / "old.db"
    shutil.copy(stores["sqlite"][0].removeprefix("sqlite:///"), copy)
    with sqlite3.connect(copy) as c:
        c.execute("UPDATE alembic_version SET version_num = '0584bdc529eb'")
    before = dump(pg, db)
    r = trackd_import(pg, db, tmp_path, f"sqlite:///{copy}")
    assert r.returncode == 1
    assert "schema revision 0584bdc529eb, the target database at dc11669786a5" in r.stderr
    assert "mlflow db upgrade sqlite:///" in r.stderr
    assert dump(pg, db) == before


def test_dry_run_writes_nothing_and_tells_what_it_would(pg, db, tmp_path, stores):
    before = dump(pg, db)
    r = trackd_import(pg, db, tmp_path, stores["file"][0], "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "dry run: nothing is written" in r.stderr
    assert counted(r.stdout, "runs imported") == 7
    assert dump(pg, db) == before


def test_a_run_larger_than_a_batch_streams_whole(pg, db, tmp_path, stores):
    """A run of more points than one transaction holds (100,000) is read key by key into
    its own transaction: all of it lands, or none."""
    src = tmp_path / "mlruns"
    shutil.copytree(stores["file"][0], src)
    _, ids = stores["file"]
    metrics = next(src.glob(f"*/{ids['failed']}")) / "metrics"
    for k in range(3):
        (metrics / f"big{k}").write_text("".join(
            f"{1_700_000_000_000 + s} {s * 0.5} {s}\n" for s in range(60_000)) + "5 1.0 0\n" * 3)
    dry = trackd_import(pg, db, tmp_path, src, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert counted(dry.stdout, "metric points imported") == 413 + 3 * 60_001
    assert pg.query(db, "SELECT count(*) FROM metrics") == [(0,)]
    r = trackd_import(pg, db, tmp_path, src)
    assert r.returncode == 0, r.stderr
    assert counted(r.stdout, "metric points duplicated in the source, kept once") == 1 + 3 * 2
    assert pg.query(db, "SELECT key, count(*) FROM metrics WHERE run_uuid = %s GROUP BY key "
                    "ORDER BY key", [ids["failed"]]) == [
        ("big0", 60_001), ("big1", 60_001), ("big2", 60_001), ("loss", 1)]
    assert pg.query(db, "SELECT step, value FROM latest_metrics WHERE run_uuid = %s AND "
                    "key = 'big1'", [ids["failed"]]) == [(59_999, 29_999.5)]


def test_one_experiment_only(pg, db, tmp_path, stores):
    r = trackd_import(pg, db, tmp_path, stores["file"][0], "--experiment", "abandoned")
    assert r.returncode == 0, r.stderr
    assert pg.query(db, "SELECT e.name, r.name FROM runs r JOIN experiments e "
                    "USING (experiment_id)") == [("abandoned", "before-deletion")]
    assert pg.query(db, "SELECT count(*) FROM registered_models") == [(0,)]
    r = trackd_import(pg, db, tmp_path, stores["file"][0], "--experiment", "nope")
    assert r.returncode == 1 and "has no experiment named 'nope'" in r.stderr


def test_interrupted_import_finishes_on_the_second_run(pg, db, tmp_path, stores):
    """kill -9 after the first batches commit; the same command again completes the import,
    and the database is the one a single uninterrupted import makes."""
    src = tmp_path / "big" / "mlruns"
    shutil.copytree(stores["file"][0], src)
    _, ids = stores["file"]
    child = next(d for d in next(src.glob(f"*/{ids['parent']}")).parent.iterdir()
                 if (d / "meta.yaml").exists()
                 and yaml.safe_load((d / "meta.yaml").read_text()).get("run_name") == "lr=0.1")
    lines = "".join(f"{1_700_000_000_000 + s} {1.0 / (s + 1)} {s}\n" for s in range(2000))
    for n in range(150):  # 150 more runs of 2,000 points: several transactions
        rid = f"{n:032x}"
        d = child.parent / rid
        shutil.copytree(child, d)
        meta = yaml.safe_load((d / "meta.yaml").read_text())
        meta.update(run_id=rid, run_uuid=rid, artifact_uri=meta["artifact_uri"].replace(
            child.name, rid))
        (d / "meta.yaml").write_text(yaml.safe_dump(meta))
        (d / "metrics" / "loss").write_text(lines)
    p = trackd_import(pg, db, tmp_path, src, "--no-progress", "--jobs", "1", bufsize=1)
    total = 157
    n = wait_for(lambda: p.poll() is not None or
                 (pg.query(db, "SELECT count(*) FROM runs")[0][0] or None), 120,
                 "the first batch to commit")
    p.send_signal(signal.SIGKILL)
    p.communicate()
    committed = pg.query(db, "SELECT count(*) FROM runs")[0][0]
    assert 0 < committed < total, f"killed after {committed} of {total} runs ({n})"
    r = trackd_import(pg, db, tmp_path, src, "--no-progress")
    assert r.returncode == 0, r.stderr
    assert counted(r.stdout, "runs already present") == committed
    assert counted(r.stdout, "runs imported") == total - committed
    whole = pg.mlflow_db(db[:40] + "_whole")
    assert trackd_import(pg, whole, tmp_path, src, "--no-progress").returncode == 0
    assert dump(pg, db) == dump(pg, whole)
    # Each copy has its template's 2,000 "loss" points and its one "val/loss" point.
    assert pg.query(db, "SELECT count(*) FROM metrics")[0][0] == 413 + 150 * (2000 + 1)


def test_help_and_a_python_without_the_importer(pg, db, tmp_path):
    r = trackd_import(pg, db, tmp_path, "--help", config=False)
    assert r.returncode == 0 and "SOURCE is an MLflow file store" in r.stdout
    # A Python without the trackd package: the message says what to install.
    r = trackd_import(pg, db, tmp_path, "mlruns", env={"TRACKD_PYTHON": "/usr/bin/python3"})
    assert r.returncode == 1
    assert "cannot load the importer" in r.stderr
    assert "pip install 'trackd[import]'" in r.stderr
    r = trackd_import(pg, db, tmp_path, tmp_path / "nothing-here")
    assert r.returncode == 1 and "not an MLflow file store" in r.stderr
