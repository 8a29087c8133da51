"""Shared nodes: the agent runs as root (as the reports found it) and serves `nobody` over an
open socket. Whatever nobody's client sends, the agent writes only below the operator's
artifact roots, never through a link nobody planted, and connects only to the configured
MLflow server."""
import os
import pwd
import shutil
import socket
import tempfile
from pathlib import Path

import pytest
from harness import Agent, Streamer, report

TS0 = 1_700_000_000_000


class Node:
    """An agent as root with an open socket (0666) and a shared artifact root (1777), and
    nobody with a home to keep files in."""

    def __init__(self, pg, db):
        self.nobody = pwd.getpwnam("nobody")
        self.base = Path(tempfile.mkdtemp(prefix="trackd-shared-"))
        os.chmod(self.base, 0o755)
        self.root = self.base / "artifacts"
        self.root.mkdir()
        os.chmod(self.root, 0o1777)  # every user may write here, as in /tmp
        self.home = self.base / "nobody"
        self.home.mkdir()
        self.give(self.home)
        self.agent = Agent(pg, db, self.base / "agent", artifact_root=str(self.root))
        self.agent.config.write_text(self.agent.config.read_text().replace(
            "[agent]\n", "[agent]\nsocket_mode = 0o666\n", 1))
        os.chmod(self.base / "agent", 0o755)
        self.agent.start()

    def give(self, path):
        os.chown(path, self.nobody.pw_uid, self.nobody.pw_gid)
        return path

    def client(self):
        """trackd-driver running as nobody."""
        def drop():
            os.setgid(self.nobody.pw_gid)
            os.setuid(self.nobody.pw_uid)
        return Streamer(self.agent.socket, preexec_fn=drop, cwd=self.home)

    def close(self):
        assert self.agent.stop() == 0
        shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture
def node(pg, db):
    if os.geteuid() != 0:
        pytest.skip("needs root to run the agent as root and a client as nobody")
    n = Node(pg, db)
    yield n
    n.close()


def errors_of(s):
    s.send("errors")
    s.send("flush", 1000)
    out = []
    while True:
        line = s.read("")
        if line[0] == "flush":
            return out
        if line[0] == "error":
            out.append((int(line[2]), line[3]))


def test_planted_symlink_is_not_followed(pg, db, node):
    """nobody makes its run's artifacts directory a link to a root-owned directory before the
    first upload: the agent (root) refuses to write through it, tells the client why, and
    the root-owned file keeps its bytes. The run's own directories are made by the agent."""
    victim_dir = Path(tempfile.mkdtemp(prefix="trackd-victim-"))
    victim = victim_dir / "model.bin"
    victim.write_bytes(b"root's own bytes\n")
    os.chmod(victim, 0o644)
    src = node.home / "model.bin"
    src.write_bytes(b"nobody's bytes\n")
    node.give(src)
    s = node.client()
    try:
        run_id = s.start_run("planted-exp", "p")
        exp_id = pg.query(db, "SELECT experiment_id FROM runs WHERE run_uuid = %s", (run_id,))[0][0]
        # What nobody can do in a 1777 root: make the run's directory and plant the link.
        run_dir = node.root / str(exp_id) / run_id
        run_dir.mkdir(parents=True)
        node.give(run_dir.parent)
        node.give(run_dir)
        os.symlink(victim_dir, run_dir / "artifacts")
        s.send("artifact", "r", str(src), "")
        assert s.read("artifact") == ["artifact", "0"]
        s.send("flush", 60000)
        assert s.read("flush") == ["flush", "0"]
        errors = errors_of(s)
        s.finish()
    finally:
        kept = victim.read_bytes()
        shutil.rmtree(victim_dir, ignore_errors=True)
    report("planted-symlink", 1, 0, 0, refused=len(errors),
           target_untouched=kept == b"root's own bytes\n")
    assert kept == b"root's own bytes\n"
    assert len(errors) == 1 and errors[0][0] == 23, errors
    assert "is a symbolic link or not a directory" in errors[0][1], errors
    status = pg.query(db, "SELECT status FROM trackd_artifacts WHERE run_uuid = %s", (run_id,))
    assert status == [("failed",)]


def test_locations_outside_the_roots_are_refused(pg, db, node):
    """nobody names experiment locations the operator did not allow: a root-owned directory,
    and an HTTP server of its own. Both are refused at the call (error 26, FORBIDDEN),
    nothing is created there, and no connection is ever made."""
    closed = Path(tempfile.mkdtemp(prefix="trackd-closed-"))  # root's, 0700
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.setblocking(False)
    port = listener.getsockname()[1]
    s = node.client()
    try:
        s.send("experiment", "in-closed", str(closed / "exp"))
        s.send("experiment", "to-my-server", f"mlflow-artifacts://127.0.0.1:{port}/x")
        s.send("experiment", "dot-dot", f"{node.root}/../escape")
        s.send("flush", 30000)
        assert s.read("flush") == ["flush", "0"]
        errors = errors_of(s)
        s.finish()
        names = [r[0] for r in pg.query(db, "SELECT name FROM experiments")]
        try:
            listener.accept()
            connected = True
        except BlockingIOError:
            connected = False
    finally:
        listener.close()
        created = os.listdir(closed)
        shutil.rmtree(closed, ignore_errors=True)
    report("locations-outside-roots", 3, 0, 0, refused=len(errors), created=len(created),
           connected=connected)
    assert [code for code, _ in errors] == [26, 26, 26], errors
    assert all("is not below an artifact root this agent may write to" in m for _, m in errors)
    assert not {"in-closed", "to-my-server", "dot-dot"} & set(names)
    assert created == [] and not connected
