import os
import shutil
import tempfile
from pathlib import Path

import pytest

from harness import BUILD, Agent, Postgres, TcpPostgres


def pytest_configure(config):
    for exe in ("trackd", "trackd-driver"):
        if not (BUILD / exe).exists():
            raise pytest.UsageError(f"{BUILD / exe} is missing: build first (./trackd-dev build)")


@pytest.fixture(scope="session")
def artifact_root():
    root = Path(tempfile.mkdtemp(prefix="trackd-art-"))
    yield root
    shutil.rmtree(root, ignore_errors=True)  # artifact tests leave GiBs here


@pytest.fixture(scope="session")
def pg(artifact_root):
    server = Postgres().start()
    server.bootstrap_template(artifact_root)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def tcp_pg(artifact_root):
    """A second server that listens on 127.0.0.1 only, as a stock PostgreSQL does."""
    pg = TcpPostgres()
    pg.start()
    pg.pause()
    pg.opts += f" -p {pg.port} -c listen_addresses=127.0.0.1"
    pg.resume()
    pg.bootstrap_template(artifact_root)
    yield pg
    pg.stop()


@pytest.fixture
def db(pg, request):
    name = "t_" + request.node.name.lower().replace("[", "_").replace("]", "").replace("-", "_")[:50]
    return pg.mlflow_db(name)


@pytest.fixture
def agent(pg, db, tmp_path, artifact_root):
    a = Agent(pg, db, tmp_path / "agent", artifact_root=str(artifact_root)).start()
    yield a
    rc = a.stop()
    assert rc == 0, f"agent exit code {rc}; log:\n{a.log()[-4000:]}"


def pytest_terminal_summary(terminalreporter):
    """Prints every fault scenario's accounting line, passed or not, after the run."""
    lines = []
    for outcome in ("passed", "failed"):
        for rep in terminalreporter.stats.get(outcome, []):
            if rep.when == "call":
                lines += [l for l in rep.capstdout.splitlines() if l.startswith("scenario=")]
    if lines:
        terminalreporter.section("fault scenarios")
        for line in lines:
            terminalreporter.write_line(line)
