"""Real services for the integration tests: a throwaway PostgreSQL 15, MLflow's
schema created by the pinned MLflow itself, trackd agents and the C driver.

Nothing here is a mock. Every wait polls a condition with a deadline.
"""
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parents[2]
BUILD = Path(os.environ.get("TRACKD_BUILD_DIR", ROOT / "build")).resolve()
PG_BIN = Path(os.environ.get("TRACKD_PG_BIN", "/usr/lib/postgresql/15/bin"))
TEMPLATE_DB = "mlflow_template"


def wait_for(cond, timeout, what, interval=0.02):
    """Polls cond() until it returns a truthy value or timeout seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def _as_postgres():
    """PostgreSQL refuses to run as root: drop to the postgres user when we are root."""
    if os.geteuid() != 0:
        return []
    return ["runuser", "-u", "postgres", "--"]


class Postgres:
    """A PostgreSQL cluster in a temporary directory, reachable only by Unix socket."""

    def __init__(self):
        self.dir = Path(tempfile.mkdtemp(prefix="trackd-pg-"))
        self.data = self.dir / "data"
        self.log = self.dir / "postgres.log"
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
        os.chmod(self.dir, 0o755)

    def start(self, durable=False):
        """durable=False turns off fsync for fast tests; benchmarks keep PostgreSQL's defaults."""
        subprocess.run(
            _as_postgres() + [str(PG_BIN / "initdb"), "-D", str(self.data), "-U", "postgres",
                              "--auth=trust", "-E", "UTF8", "--locale=C.UTF-8"],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self._set_opts(durable)
        self.resume()
        return self

    def start_standby(self, primary, durable=False):
        """A streaming replica of primary (pg_basebackup -R), read-only until promote()."""
        subprocess.run(
            _as_postgres() + [str(PG_BIN / "pg_basebackup"), "-D", str(self.data), "-R",
                              "-X", "stream", "-c", "fast", "-h", str(primary.dir), "-U", "postgres"],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self._set_opts(durable)
        self.resume()
        return self

    def _set_opts(self, durable):
        self.opts = f"-k {self.dir} -c listen_addresses=''"
        if not durable:
            self.opts += " -c fsync=off -c full_page_writes=off"

    def promote(self):
        self._pg_ctl("-w", "-t", "60", "promote")

    def crash(self):
        """Stops the server the way a power cut would: no shutdown checkpoint."""
        self._pg_ctl("-m", "immediate", "-w", "stop")

    def pause(self):
        """Stops the server, keeping its data: an outage."""
        self._pg_ctl("-m", "fast", "-w", "stop")

    def resume(self):
        """Starts the server on its data, with the settings start() chose."""
        self._pg_ctl("-l", str(self.log), "-o", self.opts, "-w", "-t", "60", "start")

    def _pg_ctl(self, *args, check=True):
        subprocess.run(_as_postgres() + [str(PG_BIN / "pg_ctl"), "-D", str(self.data), *args],
                       stdout=subprocess.DEVNULL, check=check)

    def stop(self):
        self._pg_ctl("-m", "fast", "-w", "stop", check=False)
        shutil.rmtree(self.dir, ignore_errors=True)

    def dsn(self, db):
        return f"host={self.dir} user=postgres dbname={db}"

    def url(self, db):
        return f"postgresql://postgres@/{db}?host={self.dir}"

    def connect(self, db="postgres"):
        return psycopg.connect(self.dsn(db), autocommit=True)

    def create_db(self, name, template=None):
        with self.connect() as c:
            c.execute(f'DROP DATABASE IF EXISTS "{name}"')
            if template:
                c.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
            else:
                c.execute(f'CREATE DATABASE "{name}"')

    def copy_db(self, source, db, name):
        """Copies database db of another cluster here (pg_dump | psql)."""
        self.create_db(name)
        dump = subprocess.run([str(PG_BIN / "pg_dump"), "-d", source.dsn(db)], check=True,
                              capture_output=True).stdout
        subprocess.run([str(PG_BIN / "psql"), "-q", "-v", "ON_ERROR_STOP=1", "-d",
                        self.dsn(name)], input=dump, check=True, capture_output=True)
        return name

    def bootstrap_template(self, artifact_root):
        """Lets the pinned MLflow create its schema once; test databases copy it."""
        self.create_db(TEMPLATE_DB)
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

        store = SqlAlchemyStore(self.url(TEMPLATE_DB), str(artifact_root))
        store.engine.dispose()

    def mlflow_db(self, name):
        self.create_db(name, TEMPLATE_DB)
        return name

    def query(self, db, sql, params=None):
        with self.connect(db) as c:
            return c.execute(sql, params).fetchall()


def free_port():
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TcpPostgres(Postgres):
    """The cluster on a port of its own (free_port()), which its socket file carries too; a
    test adds TCP listening with -p and listen_addresses in opts."""

    def __init__(self):
        super().__init__()
        self.port = free_port()

    def dsn(self, db):
        return super().dsn(db) + f" port={self.port}"

    def url(self, db):
        return super().url(db) + f"&port={self.port}"


class Agent:
    """A trackd agent process with its own socket, config and log."""

    def __init__(self, pg, db, workdir, artifact_root="/tmp/trackd-artifacts", extra="",
                 log_level="debug", journal_dir=None):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.socket = str(self.workdir / "trackd.sock")
        self.config = self.workdir / "agent.toml"
        self.logpath = self.workdir / "agent.log"
        # artifact_root=None keeps the agent's default, as a user's configuration would.
        mlflow = f'[mlflow]\ndefault_artifact_root = "{artifact_root}"\n' if artifact_root else ""
        self.config.write_text(
            f'[agent]\nsocket = "{self.socket}"\nlog_level = "{log_level}"\nshutdown_grace_ms = 20000\n'
            f'[postgres]\ndsn = "{pg.dsn(db)}"\n' + mlflow +
            f'[journal]\ndir = "{journal_dir or self.workdir / "journal"}"\n' + extra)
        self.proc = None
        self.command = [str(BUILD / "trackd")]  # a test may run it through a wrapper
        self.env = None  # or the whole environment to start it with

    def start(self, wait=True):
        # The log may hold earlier runs in the same directory: wait for a new "ready".
        readies = self.log().count("[agent] ready")
        self.logfile = open(self.logpath, "ab")
        self.proc = subprocess.Popen(self.command + ["--config", str(self.config)],
                                     stdout=self.logfile, stderr=subprocess.STDOUT, env=self.env)
        if wait:
            wait_for(lambda: self.proc.poll() is not None
                     or self.log().count("[agent] ready") > readies, 30, "the agent to start")
            assert self.proc.poll() is None, f"agent exited early:\n{self.log()}"
        return self

    def log(self):
        return self.logpath.read_text(errors="replace") if self.logpath.exists() else ""

    def stop(self, timeout=30):
        """SIGTERM and wait: returns the exit code."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self.logfile.close()

    def kill(self):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stats(self):
        out = subprocess.run([str(BUILD / "trackd"), "stats", "--socket", self.socket],
                             capture_output=True, text=True, check=True).stdout
        return {k: int(v) for k, v in (line.split() for line in out.splitlines())}


def esc(s):
    return str(s).replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n")


def run_driver(socket, lines, source_name=None, timeout=600, check=True):
    """Replays lines (lists of fields) through libtrackd; returns (stdout lines, returncode)."""
    script = "\n".join("\t".join(esc(f) for f in line) for line in lines) + "\n"
    cmd = [str(BUILD / "trackd-driver"), "--socket", socket]
    if source_name:
        cmd += ["--source-name", source_name]
    p = subprocess.run(cmd, input=script, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"driver failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return [l.split("\t") for l in p.stdout.splitlines()], p.returncode


def driver_runs(out):
    return {f[1]: f[2] for f in out if f[0] == "run"}


def driver_errors(out):
    return [(int(f[1]), int(f[2]), f[3]) for f in out if f[0] == "error"]


def report(scenario, sent, committed, duplicates, dead_lettered=0, dropped=0, **extra):
    """One accounting line for the "fault scenarios" summary; extra adds name=value pairs."""
    more = "".join(f" {k.replace('_', '-')}={v}" for k, v in extra.items())
    print(f"\nscenario={scenario} sent={sent} committed={committed} duplicates={duplicates} "
          f"dead-lettered={dead_lettered} dropped={dropped}{more}")


class Streamer:
    """A training process (trackd-driver) fed line by line, so a test can fault things
    around it while it logs."""

    def __init__(self, socket, **popen):
        """popen: more subprocess.Popen arguments (preexec_fn to run as another user, cwd)."""
        self.p = subprocess.Popen([str(BUILD / "trackd-driver"), "--socket", socket],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                  bufsize=1, **popen)

    def send(self, *fields):
        self.p.stdin.write("\t".join(str(f) for f in fields) + "\n")
        self.p.stdin.flush()

    def read(self, prefix):
        while True:
            line = self.p.stdout.readline()
            assert line, "the driver exited"
            if line.startswith(prefix):
                return line.rstrip("\n").split("\t")

    def start_run(self, experiment, name, alias="r"):
        """Starts a run as alias and waits until it is committed; returns its id."""
        self.send("run", alias, experiment, name, "now")
        run_id = self.read("run")[2]
        self.send("flush", 30000)
        assert self.read("flush") == ["flush", "0"]
        return run_id

    def finish(self):
        self.send("counters")
        counters = self.read("counters")
        self.p.stdin.close()
        assert self.p.wait(60) == 0
        return dict(f.split("=") for f in counters[1:])


def count(pg, db, run_id):
    return pg.query(db, "SELECT count(*), count(DISTINCT (key, step)) FROM metrics"
                        " WHERE run_uuid = %s", (run_id,))[0]
