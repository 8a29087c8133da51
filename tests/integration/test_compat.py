"""The MLflow releases trackd supports besides the pinned one: for each, a database made by
that release and that release's client. The agent starts on the database with its default
configuration, and an unchanged MLflow training script gives the same readback under
trackd: as under postgresql://. The releases come from TRACKD_COMPAT_MLFLOW
("RELEASE=PYTHON,..."), which `./trackd-dev test` sets up (tests/compat/mlflow-*.txt)."""
import os
import subprocess

import pytest
from test_mlflow_plugin import compare_under_trackd

# The schema revision each release's migrations end at.
REVISIONS = {"2.17.2": "f5a4f2784254", "2.22.5": "0584bdc529eb", "3.10.1": "1b5f0d9ad7c1"}

MAKE_DB = """
import sys
from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
SqlAlchemyStore(sys.argv[1], sys.argv[2]).engine.dispose()
"""


def compat_envs():
    """(release, python) for every environment TRACKD_COMPAT_MLFLOW names."""
    envs = os.environ.get("TRACKD_COMPAT_MLFLOW", "")
    return [tuple(e.split("=", 1)) for e in envs.split(",") if "=" in e]


def releases():
    return compat_envs() or [pytest.param(None, None, marks=pytest.mark.skip(
        reason="TRACKD_COMPAT_MLFLOW is not set: run ./trackd-dev test, which makes them"))]


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
