"""Shared nodes: the agent runs as root (as the reports found it) and serves `nobody` over an
open socket. Whatever nobody's client sends, the agent writes only below the operator's
artifact roots, never through a link nobody planted, connects only to the configured MLflow
server, writes no run nobody did not start, and logs what nobody claims without letting it
forge a line. Users in no passwd file (uids 64001..) stand for colleagues sharing a group."""
import os
import pwd
import struct
import shutil
import socket
import subprocess
import tempfile
import threading
from pathlib import Path

import pytest
from harness import BUILD, Agent, Streamer, driver_runs, report, run_driver, wait_for
from rawproto import KINDS, Raw, error_fields, frame

TS0 = 1_700_000_000_000


class Node:
    """An agent as root with an open socket (0666) and a shared artifact root (1777), and
    nobody with a home to keep files in."""

    def __init__(self, pg, db, extra=""):
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
            "[agent]\n", "[agent]\nsocket_mode = 0o666\n" + extra, 1))
        os.chmod(self.base / "agent", 0o755)
        self.agent.start()

    def give(self, path):
        os.chown(path, self.nobody.pw_uid, self.nobody.pw_gid)
        return path

    def client(self):
        """trackd-driver running as nobody."""
        return self.client_as(self.nobody.pw_uid, self.nobody.pw_gid, [], cwd=self.home)

    def client_as(self, uid, gid, groups, cwd=None):
        """trackd-driver running as uid with primary group gid and supplementary groups."""
        def drop():
            os.setgroups(groups)
            os.setgid(gid)
            os.setuid(uid)
        return Streamer(self.agent.socket, preexec_fn=drop, cwd=cwd or self.base)

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


def run_rows(pg, db, run_id):
    """Everything MLflow shows of a run."""
    q = lambda sql: sorted(pg.query(db, sql, (run_id,)))
    return {
        "run": q("SELECT name, user_id, status, end_time, lifecycle_stage FROM runs"
                 " WHERE run_uuid = %s"),
        "tags": q("SELECT key, value FROM tags WHERE run_uuid = %s"),
        "params": q("SELECT key, value FROM params WHERE run_uuid = %s"),
        "metrics": q("SELECT key, value, step FROM metrics WHERE run_uuid = %s"),
        "latest": q("SELECT key, value, step FROM latest_metrics WHERE run_uuid = %s"),
    }


def test_another_users_run_is_refused(pg, db, node):
    """root starts a run; nobody knows its id and re-sends start_run for it with its own name
    and tags, then logs a metric, a param, a tag, an artifact and ends it. Every event is
    refused with error 26 naming both uids, root's run is exactly as it was, and root can go
    on logging to it. nobody's own runs are not hindered."""
    owner = Streamer(node.agent.socket)
    run_id = owner.start_run("owned-exp", "roots-run")
    owner.send("param", "r", "lr", "0.1")
    owner.send("metric", "r", "loss", "1.5", "0", str(TS0))
    owner.send("flush", 30000)
    assert owner.read("flush") == ["flush", "0"]
    before = run_rows(pg, db, run_id)
    assert before["run"][0][:2] == ("roots-run", "root") and before["params"] == [("lr", "0.1")]
    src = node.home / "weights.bin"
    src.write_bytes(b"nobody's weights")
    node.give(src)

    s = node.client()
    s.send("runid", "x", run_id, "owned-exp", "nobody-was-here", "now", "team", "nobody")
    s.send("metric", "x", "loss", "9.9", "1", str(TS0 + 1))
    s.send("param", "x", "lr", "0.9")
    s.send("param", "x", "nobody-param", "1")
    s.send("tag", "x", "mlflow.runName", "renamed")
    s.send("artifact", "x", str(src), "")
    assert s.read("artifact") == ["artifact", "0"]
    s.send("end", "x", "KILLED", "now")
    s.send("flush", 60000)
    assert s.read("flush") == ["flush", "0"]
    errors = errors_of(s)
    mine = s.start_run("nobodys-exp", "nobodys-own")
    s.send("metric", "r", "acc", "0.5", "0", str(TS0))
    s.send("flush", 30000)
    assert s.read("flush") == ["flush", "0"]
    assert errors_of(s) == []
    s.finish()

    # The owner is not disturbed: its next event lands.
    owner.send("metric", "r", "loss", "1.25", "1", str(TS0 + 2))
    owner.send("flush", 30000)
    assert owner.read("flush") == ["flush", "0"]
    owner.finish()
    after = run_rows(pg, db, run_id)
    stats = node.agent.stats()
    uploaded = list(node.root.rglob("weights.bin"))
    report("another-users-run", len(errors), 0, 0, refused=len(errors),
           run_unchanged=after["run"] == before["run"] and after["tags"] == before["tags"],
           rejected_not_owner=stats["rejected_not_owner"])
    assert errors and all(code == 26 for code, _ in errors), errors
    want = (f"Permission denied: run {run_id} was started by uid 0; uid {node.nobody.pw_uid} "
            f"(nobody) may not write to it.")
    assert all(m.startswith(want) for _, m in errors), errors
    assert "[agent] shared_gids" in errors[0][1]
    # Start, its tags, metric, two params, tag, artifact, end: none of them is written.
    assert stats["rejected_not_owner"] == len(errors) >= 8, (stats, errors)
    assert after["run"] == before["run"] and after["tags"] == before["tags"]
    assert after["params"] == before["params"]
    assert after["metrics"] == sorted(before["metrics"] + [("loss", 1.25, 1)])
    assert uploaded == []
    assert pg.query(db, "SELECT count(*) FROM trackd_artifacts WHERE run_uuid = %s",
                    (run_id,)) == [(0,)]
    # The owners as recorded: root's run is uid 0's, nobody's its own.
    owners = dict(pg.query(db, "SELECT run_uuid, uid FROM trackd_run_owners"))
    assert owners[run_id] == 0 and owners[mine] == node.nobody.pw_uid
    assert run_rows(pg, db, mine)["metrics"] == [("acc", 0.5, 0)]


@pytest.fixture
def group_node(pg, db):
    if os.geteuid() != 0:
        pytest.skip("needs root to run clients as other users")
    n = Node(pg, db, extra="shared_gids = \"64100\"\n")
    yield n
    n.close()


def test_shared_group_members_write_each_others_runs(pg, db, group_node):
    """[agent] shared_gids = 64100: uid 64001 starts a run; uid 64002, also in group 64100
    (a supplementary group), logs to it, as DDP ranks of two users would; uid 64003, in
    another group, is refused. A run MLflow created itself (no owner row) belongs to the
    user its user_id names: nobody else may write it."""
    node = group_node
    a = node.client_as(64001, 64001, [64100])
    run_id = a.start_run("ddp-exp", "rank0")
    b = node.client_as(64002, 64002, [64100])
    c = node.client_as(64003, 64003, [64200])
    for k, (s, alias) in enumerate(((b, "b"), (c, "c"))):
        s.send("runid", alias, run_id, "ddp-exp", "", "now")
        s.send("metric", alias, f"rank{k + 1}", "1.0", "0", str(TS0))
        s.send("flush", 30000)
        assert s.read("flush") == ["flush", "0"]
    errors_b, errors_c = errors_of(b), errors_of(c)
    # A run made by MLflow for "root", as mlflow.start_run() would, outside trackd.
    exp_id = pg.query(db, "SELECT experiment_id FROM experiments WHERE name = 'ddp-exp'")[0][0]
    foreign = "f" * 32
    pg.query(db, "INSERT INTO runs (run_uuid, name, source_type, source_name, entry_point_name,"
                 " user_id, status, start_time, source_version, lifecycle_stage, artifact_uri,"
                 " experiment_id) VALUES (%s, 'by-mlflow', 'LOCAL', '', '', 'root', 'RUNNING',"
                 " 1, '', 'active', '/tmp/x', %s) RETURNING run_uuid", (foreign, exp_id))
    b.send("metric", foreign, "stolen", "1.0", "0", str(TS0))
    b.send("flush", 30000)
    assert b.read("flush") == ["flush", "0"]
    errors_foreign = errors_of(b)
    root = Streamer(node.agent.socket)
    # Its user resumes it (start_run with its id): allowed, and the run stays without an owner
    # row: a start that creates nothing claims nothing.
    root.send("runid", "f", foreign, "ddp-exp", "", "now")
    root.send("metric", "f", "mine", "2.0", "0", str(TS0))
    root.send("flush", 30000)
    assert root.read("flush") == ["flush", "0"]
    assert errors_of(root) == []
    for s in (a, b, c, root):
        s.finish()
    keys = sorted(r[0] for r in pg.query(db, "SELECT key FROM metrics WHERE run_uuid = %s",
                                         (run_id,)))
    foreign_keys = [r[0] for r in pg.query(db, "SELECT key FROM metrics WHERE run_uuid = %s",
                                           (foreign,))]
    report("shared-group", 4, len(keys) + len(foreign_keys), 0,
           refused=len(errors_c) + len(errors_foreign))
    assert errors_b == [] and keys == ["rank1"], (errors_b, keys)
    assert errors_c and all(code == 26 for code, _ in errors_c), errors_c
    assert "was started by uid 64001; uid 64003 (64003)" in errors_c[0][1]
    assert errors_foreign == [(26, f"Permission denied: run {foreign} was not started through "
                                   "trackd; it belongs to the local user named by its user_id "
                                   "('root'), and uid 64002 (64002) may not write to it "
                                   "([agent] open_unowned_runs lets anyone)")]
    assert foreign_keys == ["mine"]
    assert pg.query(db, "SELECT count(*) FROM trackd_run_owners WHERE run_uuid = %s",
                    (foreign,)) == [(0,)]
    assert pg.query(db, "SELECT uid, shared_gids FROM trackd_run_owners WHERE run_uuid = %s",
                    (run_id,)) == [(64001, [64100])]


def test_a_claimed_user_cannot_forge_log_lines(pg, db, node):
    """nobody claims an mlflow.user holding a newline and a fake log line: the agent logs the
    claim with the newline escaped, and no line of its log starts with the forgery."""
    forged = "2026-01-01T00:00:00.000Z WARN [conn 1] pid 1 uid 0: FORGED"
    s = node.client()
    s.send("run", "r", "claims-exp", "", "now", "mlflow.user", "mallory\\n" + forged)
    s.send("flush", 30000)
    assert s.read("flush") == ["flush", "0"]
    s.finish()
    log = node.agent.log()
    lines = log.splitlines()
    report("forged-log-line", 1, 1, 0, forged_lines=sum(l.startswith(forged) for l in lines))
    assert not any(l.startswith(forged) or l.startswith("FORGED") for l in lines)
    assert 'claimed mlflow.user "mallory\\n' + forged[:40] in log, log[-2000:]
    user = pg.query(db, "SELECT user_id FROM runs r JOIN experiments e USING (experiment_id)"
                        " WHERE e.name = 'claims-exp'")
    assert user == [("nobody",)]


def test_flush_flood_by_one_user(pg, db, node):
    """nobody sends 70,000 flush requests while its point waits behind a lock; root's client
    flushes meanwhile and gets no error. nobody is told, for each request over its
    connection's bound (1,024), and its answered flushes arrive once the lock goes."""
    import psycopg

    out, _ = run_driver(node.agent.socket, [["run", "r", "flood-exp", "f", "now"],
                                            ["flush", "30000"]])
    run_id = driver_runs(out)["r"]
    lock = psycopg.connect(pg.dsn(db))
    lock.execute("LOCK TABLE latest_metrics IN ACCESS EXCLUSIVE MODE")
    flood, = Raw.connected_as(node.agent.socket, node.nobody.pw_uid, node.nobody.pw_gid,
                              timeout=120)
    flood.hello()
    n = 70_000
    # Its own run, so the point is nobody's to write.
    mine = "e" * 32
    flood.send(frame("start_run", [mine, "flood-exp", "n", TS0, []], seq=2))
    flood.send(frame("metrics", [mine, ["m", 1.0, TS0, 0]], seq=3))
    sender = threading.Thread(target=flood.send, args=(b"".join(
        frame("flush", [], seq=4 + i) for i in range(n)),))
    sender.start()
    refused = answered = 0
    p = None
    while refused + answered < n:
        kind, _, body = flood.read()
        if kind == KINDS["error"]:
            assert "too many flush requests outstanding on this connection (1024)" in \
                error_fields(body)[2], error_fields(body)
            refused += 1
        elif kind == KINDS["flushed"]:
            answered += 1
        if refused == n - 1024 and p is None:
            # The other user's client, while the flooder holds its 1,024 barriers.
            p = subprocess.Popen([str(BUILD / "trackd-driver"), "--socket", node.agent.socket],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            p.stdin.write(f"metric\t{run_id}\tx\t1\t0\t{TS0}\n"
                          "flush\t60000\nerrors\ncounters\n")
            p.stdin.close()
            lock.commit()  # the database takes the points: every barrier is answered
    sender.join()
    lock.close()
    other = p.stdout.read()
    assert p.wait(60) == 0
    other_errors = [l for l in other.splitlines() if l.startswith("error\t")]
    report("flush-flood", n, answered, 0, refused=refused, other_client_errors=len(other_errors))
    assert refused == n - 1024 and answered == 1024
    assert "flush\t0" in other and other_errors == [] and "errors=0" in other, other
    assert node.agent.stats()["flushes_refused"] == n - 1024
    assert pg.query(db, "SELECT count(*) FROM metrics WHERE run_uuid IN (%s, %s)",
                    (run_id, mine)) == [(2,)]
    flood.close()


def test_one_users_partial_frames_do_not_close_anothers(pg, db):
    """Memory for incomplete frames is shared (max_read_buffer_bytes = 1 MiB); root's client
    is the first to hold part of a large frame, then nobody opens six connections holding
    300 KB each. The agent closes nobody's connections, the uid holding the most, and
    root's frame completes and is written."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run a client as nobody")
    node = Node(pg, db, extra="max_read_buffer_bytes = 1048576\nmax_frame_bytes = 1048576\n")
    try:
        out, _ = run_driver(node.agent.socket, [["run", "r", "partial-exp", "p", "now"],
                                                ["flush", "30000"]])
        run_id = driver_runs(out)["r"]
        mine = Raw(node.agent.socket, timeout=30)
        mine.hello()
        points = [x for i in range(8_000) for x in ("k%d" % i, float(i), TS0, i)]  # ~220 KB
        whole = frame("metrics", [run_id, points], seq=2)
        mine.send(whole[:100_000])
        theirs = Raw.connected_as(node.agent.socket, node.nobody.pw_uid, node.nobody.pw_gid, 6)
        for r in theirs:
            r.hello()
            r.send(b"TK\x01\x06" + struct.pack(">IQ", 900_000, 2) + b"\x00" * 300_000)
        wait_for(lambda: node.agent.stats()["closed_read_memory"] >= 1, 30,
                 "partial frames to be shed")
        mine.send(whole[100_000:] + frame("flush", [], seq=3))
        while True:
            kind, seq, body = mine.read()
            assert kind != KINDS["error"], (error_fields(body), node.agent.log()[-4000:])
            if kind == KINDS["flushed"]:
                break
        stats = node.agent.stats()
        log = node.agent.log()
        written = pg.query(db, "SELECT count(*) FROM metrics WHERE run_uuid = %s", (run_id,))
        report("partial-frames-of-one-user", 8_000, written[0][0], 0,
               closed=stats["closed_read_memory"])
        assert written == [(8_000,)]
        assert stats["closed_read_memory"] >= 1
        assert f"uid {node.nobody.pw_uid}: incomplete frames over all clients" in log
        assert "uid 0: incomplete frames" not in log
        for r in theirs:
            r.close()
        mine.close()
    finally:
        node.close()


def test_one_user_cannot_take_every_connection(pg, db):
    """max_connections_per_uid = 4: nobody's fifth and sixth connections are closed at once,
    and root still connects and logs."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run a client as nobody")
    node = Node(pg, db, extra="max_connections_per_uid = 4\n")
    try:
        theirs = Raw.connected_as(node.agent.socket, node.nobody.pw_uid, node.nobody.pw_gid, 6,
                                  timeout=10)
        served = 0
        for r in theirs:
            try:
                r.send(frame("hello", [1, 4242, "raw", "raw.py", "LOCAL", "rawproto"], seq=1))
                got = r.read()
            except OSError:  # closed before the hello could even be written
                got = None
            served += got is not None and got[0] == KINDS["welcome"]
        out, _ = run_driver(node.agent.socket, [["run", "r", "conn-exp", "c", "now"],
                                                ["metric", "r", "x", "1", "0", str(TS0)],
                                                ["flush", "30000"], ["errors"]])
        stats = node.agent.stats()
        report("connections-per-uid", 6, served, 0, refused=stats["connections_rejected"])
        assert served == 4 and stats["connections_rejected"] == 2
        assert ["flush", "0"] in out and not [l for l in out if l[0] == "error"], out
        assert f"uid {node.nobody.pw_uid}: it has 4 already ([agent] max_connections_per_uid)" \
            in node.agent.log()
        for r in theirs:
            r.close()
    finally:
        node.close()
