"""A real `mlflow server` from the pinned MLflow, reading a test database, so tests
can check that MLflow's REST API and UI take trackd's rows as MLflow's own.

It listens on 127.0.0.1 only, logs to a file in its work directory, is waited for
by polling /health with a deadline, and is stopped with SIGTERM (SIGKILL if it hangs).
"""
import json
import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from harness import wait_for

MLFLOW = Path(sys.executable).parent / "mlflow"
HOST = "127.0.0.1"


def free_port():
    """A port the kernel just handed out; another process could take it before we bind."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class MlflowServer:
    """One `mlflow server` process group: the CLI and the uvicorn worker it spawns."""

    def __init__(self, backend_store_uri, workdir):
        self.backend_store_uri = backend_store_uri
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.logpath = self.workdir / "mlflow-server.log"
        self.proc = None
        self.port = None

    @property
    def url(self):
        return f"http://{HOST}:{self.port}"

    def start(self, timeout=180, attempts=3):
        """Starts the server and returns once /health answers OK. A port taken between
        free_port() and the server's bind shows as an early exit; that is retried."""
        for attempt in range(attempts):
            self._spawn()
            try:
                wait_for(lambda: self.proc.poll() is not None or self._healthy(), timeout,
                         f"mlflow server on port {self.port} to answer /health", interval=0.25)
            except TimeoutError as e:
                raise AssertionError(f"{e}; log {self.logpath}:\n{self.log()[-6000:]}") from None
            if self.proc.poll() is None:
                return self
            if "address already in use" not in self.log().lower() or attempt == attempts - 1:
                raise AssertionError(f"mlflow server exited with {self.proc.returncode}; "
                                     f"log {self.logpath}:\n{self.log()[-6000:]}")
        return self

    def restart(self, timeout=180):
        """Starts the server again on the port it had (after stop()): an outage ends."""
        self._spawn(self.port)
        wait_for(lambda: self.proc.poll() is not None or self._healthy(), timeout,
                 f"mlflow server on port {self.port} to answer /health again", interval=0.25)
        assert self.proc.poll() is None, f"mlflow server did not restart:\n{self.log()[-4000:]}"
        return self

    def _spawn(self, port=None):
        self.port = port or free_port()
        env = dict(os.environ)
        # The job runner forks a pool of huey consumers that these tests never use;
        # on a 2-core machine they only slow the start. Telemetry would try the network.
        env.update(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", MLFLOW_DISABLE_TELEMETRY="true",
                   DO_NOT_TRACK="true")
        cmd = [str(MLFLOW), "server", "--backend-store-uri", self.backend_store_uri,
               "--host", HOST, "--port", str(self.port), "--workers", "1",
               "--serve-artifacts", "--artifacts-destination", str(self.workdir / "artifacts")]
        with open(self.logpath, "ab") as log:
            log.write(f"$ {' '.join(cmd)}\n".encode())
            log.flush()
            # Its own session, so stop() can reach the uvicorn worker if the CLI hangs.
            self.proc = subprocess.Popen(cmd, cwd=self.workdir, env=env, stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def _healthy(self):
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=5) as r:
                return r.status == 200 and r.read().strip() == b"OK"
        except (OSError, urllib.error.URLError):
            return False

    def log(self):
        return self.logpath.read_text(errors="replace") if self.logpath.exists() else ""

    def _request(self, req):
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            raise AssertionError(f"{req.get_method()} {req.full_url} -> {e.code}: "
                                 f"{e.read().decode(errors='replace')[:2000]}") from None

    def get(self, endpoint, **params):
        """GET /api/2.0/mlflow/<endpoint>?params; returns the decoded JSON body."""
        query = urllib.parse.urlencode(params)
        return self._request(urllib.request.Request(f"{self.url}/api/2.0/mlflow/{endpoint}?{query}"))

    def post(self, endpoint, body):
        """POST /api/2.0/mlflow/<endpoint> with a JSON body; returns the decoded JSON body."""
        return self._request(urllib.request.Request(
            f"{self.url}/api/2.0/mlflow/{endpoint}", data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"}, method="POST"))

    def stop(self, timeout=30):
        """SIGTERM to the CLI (it forwards the signal to uvicorn) and wait; SIGKILL to the
        whole group on timeout. Returns the CLI's exit code."""
        if self.proc is None:
            return 0
        pgid = self.proc.pid
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(pgid, signal.SIGKILL)
                self.proc.wait()
        # A worker that outlived its CLI still holds the database; it gets no grace.
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return self.proc.returncode

    def __enter__(self):
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc):
        self.stop()
