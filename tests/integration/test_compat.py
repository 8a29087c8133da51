"""The MLflow releases trackd supports besides the pinned one: for each, a database made by
that release and that release's client. The agent starts on the database with its default
configuration, and an unchanged MLflow training script gives the same readback under
trackd: as under postgresql://. Releases before 2.17 (whose clients the plugin does not
support) give the database and the reader only: trackd's own client writes, and what that
release's MLflow reads back matches what it wrote itself. The releases come from
TRACKD_COMPAT_MLFLOW ("RELEASE=PYTHON,..."), which `./trackd-dev test` sets up
(tests/compat/mlflow-*.txt)."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
from harness import Agent
from test_mlflow_plugin import compare_under_trackd

# The schema revision each release's migrations end at.
REVISIONS = {"2.10.2": "acf3f17fdcc7", "2.17.2": "f5a4f2784254", "2.22.5": "0584bdc529eb",
             "3.10.1": "1b5f0d9ad7c1"}
# The first release whose client the plugin supports (trackd/mlflow_compat.py).
FIRST_CLIENT = (2, 17)

MAKE_DB = """
import sys
from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
SqlAlchemyStore(sys.argv[1], sys.argv[2]).engine.dispose()
"""


def _version(release):
    return tuple(int(x) for x in release.split(".")[:2])


def _all_envs():
    envs = os.environ.get("TRACKD_COMPAT_MLFLOW", "")
    return [tuple(e.split("=", 1)) for e in envs.split(",") if "=" in e]


def compat_envs():
    """(release, python) for every environment TRACKD_COMPAT_MLFLOW names whose client the
    plugin supports."""
    return [e for e in _all_envs() if _version(e[0]) >= FIRST_CLIENT]


def _or_skip(envs):
    return envs or [pytest.param(None, None, marks=pytest.mark.skip(
        reason="TRACKD_COMPAT_MLFLOW is not set: run ./trackd-dev test, which makes them"))]


def releases():
    return _or_skip(compat_envs())


def database_only_releases():
    return _or_skip([e for e in _all_envs() if _version(e[0]) < FIRST_CLIENT])


_templates = {}


def release_db(pg, artifact_root, release, python, name):
    """A database made by release's own SqlAlchemyStore (copied from a template made once)."""
    template = _templates.get(release)
    if template is None:
        template = f"template_mlflow_{release.replace('.', '_')}"
        pg.create_db(template)
        subprocess.run([python, "-c", MAKE_DB, pg.url(template), str(artifact_root)],
                       check=True, capture_output=True, timeout=300)
        assert pg.query(template, "SELECT version_num FROM alembic_version") == \
            [(REVISIONS[release],)]
        _templates[release] = template
    pg.create_db(name, template)
    return name


@pytest.mark.parametrize("release,python", releases())
def test_release(pg, tmp_path, artifact_root, release, python):
    def new_db(name):
        return release_db(pg, artifact_root, release, python,
                          f"{name}_{release.replace('.', '_')}")

    version = subprocess.run([python, "-c", "import mlflow; print(mlflow.__version__)"],
                             check=True, capture_output=True, text=True).stdout.strip()
    assert version == release
    seen, agent = compare_under_trackd(pg, tmp_path, python, new_db)
    log = agent.log()
    print(f"\nscenario=mlflow-{release} runs={len(seen) - 2} "
          f"revision={REVISIONS[release]} agent-warnings={log.count(' WARN ')}")
    assert f"MLflow schema revision {REVISIONS[release]}" in log
    assert "is not one trackd is tested with" not in log


# The same history, logged by an old release's MLflow on postgresql:// and by trackd's own
# client through the agent. tags.value holds 5000 characters before MLflow 2.17: trackd's
# client sends a 6000-character tag (its own limit is 8000) and the agent cuts it there, as
# MLflow 2.16 cuts it; MLflow 2.10 to 2.15 refuse it, so their script logs the 5000 kept.
LOG_WITH_MLFLOW = textwrap.dedent('''
    import mlflow, sys
    mlflow.set_tracking_uri(sys.argv[1])
    mlflow.set_experiment("old-release")
    with mlflow.start_run(run_name="resnet") as run:
        mlflow.log_params({"lr": "0.1", "layers": "4"})
        for step in range(50):
            mlflow.log_metric("loss", 1.0 / (step + 1), step=step, timestamp=1000 + step)
        mlflow.log_metric("diverged", float("nan"), step=0, timestamp=2000)
        mlflow.set_tag("team", "vision")
        mlflow.set_tag("long", "\\u00e9" * 5000)
    print(run.info.run_id)
''')

LOG_WITH_TRACKD = textwrap.dedent('''
    import sys, trackd
    with trackd.start_run(experiment="old-release", run_name="resnet", socket=sys.argv[1]) as run:
        trackd.log_params({"lr": "0.1", "layers": "4"})
        for step in range(50):
            trackd.log_metric("loss", 1.0 / (step + 1), step=step, timestamp=1000 + step)
        trackd.log_metric("diverged", float("nan"), step=0, timestamp=2000)
        trackd.set_tag("team", "vision")
        trackd.set_tag("long", "\\u00e9" * 6000)
    assert trackd.flush(60), trackd.errors()
    print(run.run_id)
''')

READ_RUN = textwrap.dedent('''
    import json, math, sys
    from mlflow import MlflowClient
    c = MlflowClient(sys.argv[1])
    r = c.get_run(sys.argv[2])
    exp = c.get_experiment(r.info.experiment_id)
    def clean(v):
        return "nan" if math.isnan(v) else v
    print(json.dumps({
        "experiment": exp.name, "experiment_stage": exp.lifecycle_stage,
        "name": r.info.run_name, "status": r.info.status, "stage": r.info.lifecycle_stage,
        "ended": r.info.end_time is not None, "params": r.data.params,
        "tags": {k: v for k, v in r.data.tags.items() if not k.startswith("mlflow.")},
        "run_name_tag": r.data.tags.get("mlflow.runName"),
        "metrics": {k: clean(v) for k, v in r.data.metrics.items()},
        "history": {k: sorted((m.step, m.timestamp, clean(m.value))
                              for m in c.get_metric_history(r.info.run_id, k))
                    for k in r.data.metrics},
        "runs_in_experiment": len(c.search_runs([exp.experiment_id])),
    }, sort_keys=True))
''')


@pytest.mark.parametrize("release,python", database_only_releases())
def test_database_of_a_release_before_the_plugin(pg, tmp_path, artifact_root, release, python):
    """A database made by MLflow 2.10: the agent starts on it with its default configuration,
    trackd's client logs a run, and that release's MLflow reads back what it reads for the same
    run logged by itself, the 6,000-character tag cut to its 5,000 included."""
    pytest.importorskip("trackd._trackd")

    def run(py, *args):
        p = subprocess.run([py, *args], capture_output=True, text=True, timeout=300,
                           cwd=tmp_path)
        assert p.returncode == 0, p.stderr[-4000:]
        return p.stdout.strip().splitlines()[-1]

    tag = release.replace(".", "_")
    db_ml = release_db(pg, artifact_root, release, python, f"old_mlflow_{tag}")
    db_tr = release_db(pg, artifact_root, release, python, f"old_trackd_{tag}")
    (tmp_path / "log_mlflow.py").write_text(LOG_WITH_MLFLOW)
    (tmp_path / "log_trackd.py").write_text(LOG_WITH_TRACKD)
    (tmp_path / "read.py").write_text(READ_RUN)

    run_ml = run(python, "log_mlflow.py", pg.url(db_ml))
    agent = Agent(pg, db_tr, tmp_path / "agent").start()
    try:
        run_tr = run(sys.executable, "log_trackd.py", str(agent.socket))
        stats = agent.stats()
    finally:
        assert agent.stop() == 0
    seen_ml = json.loads(run(python, "read.py", pg.url(db_ml), run_ml))
    seen_tr = json.loads(run(python, "read.py", pg.url(db_tr), run_tr))
    print(f"\nscenario=database-of-mlflow-{release} revision={REVISIONS[release]} "
          f"metrics={stats['metrics_committed']} long-tag={len(seen_tr['tags']['long'])}")

    assert seen_tr == seen_ml
    assert seen_tr["tags"]["long"] == "\u00e9" * 5000
    assert len(seen_tr["history"]["loss"]) == 50 and seen_tr["status"] == "FINISHED"
    assert pg.query(db_tr, "SELECT length(value) FROM tags WHERE key = 'long'") == [(5000,)]
    assert stats["metrics_committed"] == 51 and stats["batches_failed"] == 0
    log = agent.log()
    assert f"MLflow schema revision {REVISIONS[release]}" in log
    warnings = [line for line in log.splitlines()
                if " WARN " in line and "running as root" not in line]
    assert warnings == []


def test_the_plugin_names_the_supported_range(tmp_path):
    """An MLflow outside 2.17 to 3.17 gets one clear sentence at import, not an error from
    deep inside MLflow."""
    import sys
    probe = ("import mlflow\n"
             "mlflow.__version__ = '4.0.0'\n"
             "import trackd.mlflow_compat\n")
    p = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode != 0
    assert ("ImportError: trackd's MLflow plugin supports MLflow 2.17 through 3.17; this is "
            "MLflow 4.0.0") in p.stderr, p.stderr[-2000:]
