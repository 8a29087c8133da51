"""Hostile and broken clients on a shared agent: who may connect and as whom, every per-connection
limit, and malformed input, while a well-behaved client keeps logging. Each limit is checked by
what the client sees (an error frame, then the close), the counter, and the agent's log line."""
import os
import pwd
import resource
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from harness import BUILD, Agent, driver_runs, run_driver, wait_for
from rawproto import KINDS, Raw, error_fields, frame, mp

TS0 = 1_700_000_000_000
SANITIZED = "asan" in str(BUILD)


def start_agent(pg, db, tmp_path, artifact_root, agent_extra="", **kw):
    extra = "[agent]\n" + agent_extra if agent_extra else ""
    a = Agent(pg, db, tmp_path / "agent", artifact_root=str(artifact_root), log_level="info", **kw)
    if extra:
        # The harness writes [agent] first: our keys go there, replacing any it set.
        ours = {line.split("=")[0].strip() for line in agent_extra.splitlines() if "=" in line}
        text = "".join(line for line in a.config.read_text().splitlines(keepends=True)
                       if line.split("=")[0].strip() not in ours)
        a.config.write_text(text.replace("[agent]\n", extra, 1))
        for line in agent_extra.splitlines():
            if line.startswith("socket ="):
                a.socket = line.split("=", 1)[1].strip().strip('"')
    return a.start()


def read_error(r):
    got = r.read()
    assert got is not None, "the agent closed the connection without an error frame"
    kind, _, body = got
    assert kind == KINDS["error"], kind
    return error_fields(body)


def closed(r):
    """True once the agent has closed r (reads until EOF; error frames are skipped)."""
    try:
        while True:
            got = r.read()
            if got is None:
                return True
    except (socket.timeout, TimeoutError):
        return False
    except ConnectionResetError:
        return True


def vm(pid, field):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


# ---- identity ---------------------------------------------------------------------------------

def test_claimed_user_is_overridden_and_counted(pg, db, tmp_path, artifact_root):
    a = start_agent(pg, db, tmp_path, artifact_root)
    try:
        me = pwd.getpwuid(os.geteuid()).pw_name
        out, _ = run_driver(a.socket, [["run", "r", "id-exp", "claims", "now", "mlflow.user", "mallory"],
                                       ["tag", "r", "mlflow.user", "mallory"], ["flush", "30000"]])
        run_id = driver_runs(out)["r"]
        assert pg.query(db, "SELECT user_id FROM runs WHERE run_uuid = %s", (run_id,)) == [(me,)]
        assert pg.query(db, "SELECT value FROM tags WHERE run_uuid = %s AND key = 'mlflow.user'",
                        (run_id,)) == [(me,)]
        assert a.stats()["identity_overridden"] == 2
        assert 'claimed mlflow.user "mallory"; using "%s"' % me in a.log()
    finally:
        assert a.stop() == 0


def test_trust_client_user_keeps_the_claim(pg, db, tmp_path, artifact_root):
    a = start_agent(pg, db, tmp_path, artifact_root, "trust_client_user = true\n")
    try:
        out, _ = run_driver(a.socket, [["run", "r", "id-exp", "trusted", "now", "mlflow.user", "svc-train"],
                                       ["flush", "30000"]])
        run_id = driver_runs(out)["r"]
        assert pg.query(db, "SELECT user_id FROM runs WHERE run_uuid = %s", (run_id,)) == [("svc-train",)]
        assert pg.query(db, "SELECT value FROM tags WHERE run_uuid = %s AND key = 'mlflow.user'",
                        (run_id,)) == [("svc-train",)]
        assert a.stats()["identity_overridden"] == 0
    finally:
        assert a.stop() == 0


def test_allow_lists_refuse_other_peers(pg, db, tmp_path, artifact_root):
    """Only uid and gid 54321 (and the agent's own user) may connect: a client running as
    nobody is refused, however open the socket's mode."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run a client as another user")
    nobody = pwd.getpwnam("nobody")
    sockdir = Path(tempfile.mkdtemp(prefix="trackd-allow-"))
    os.chmod(sockdir, 0o755)
    sock = sockdir / "trackd.sock"
    a = start_agent(pg, db, tmp_path, artifact_root,
                    f'socket = "{sock}"\nsocket_mode = 0o666\nallowed_uids = "54321"\n'
                    'allowed_gids = "54321"\n')
    try:
        probe = ("import socket, sys; s = socket.socket(socket.AF_UNIX); s.settimeout(10); "
                 f"s.connect({str(sock)!r}); print(repr(s.recv(100)))")

        def as_nobody():
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
        p = subprocess.run(["/usr/bin/python3", "-c", probe], preexec_fn=as_nobody, capture_output=True,
                           text=True, timeout=30)
        assert p.stdout.strip() == "b''", (p.stdout, p.stderr)  # closed without a word
        st = a.stats()  # the agent's own user is always served
        assert st["connections_refused_identity"] == 1
        assert (f"uid {nobody.pw_uid} gid {nobody.pw_gid}: not in [agent] allowed_uids or "
                "allowed_gids") in a.log()
        # A listed user is served: list nobody by name.
    finally:
        assert a.stop() == 0
    b = start_agent(pg, db, tmp_path, artifact_root,
                    f'socket = "{sock}"\nsocket_mode = 0o666\nallowed_uids = "54321, nobody"\n')
    try:
        hello = frame("hello", [1, 4242, "raw", "raw.py", "LOCAL", "rawproto"], seq=1)
        probe = ("import socket; s = socket.socket(socket.AF_UNIX); s.settimeout(10); "
                 f"s.connect({str(sock)!r}); s.sendall({hello!r}); print(s.recv(4)[:2])")
        p = subprocess.run(["/usr/bin/python3", "-c", probe], preexec_fn=as_nobody, capture_output=True,
                           text=True, timeout=30)
        assert p.stdout.strip() == "b'TK'", (p.stdout, p.stderr)  # the welcome
        assert b.stats()["connections_refused_identity"] == 0
    finally:
        assert b.stop() == 0
        shutil.rmtree(sockdir, ignore_errors=True)


def test_check_config_names_an_unknown_allowed_user(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[agent]\nallowed_uids = "no-such-user-here"\n')
    p = subprocess.run([str(BUILD / "trackd"), "--check-config", str(cfg)], capture_output=True, text=True)
    assert p.returncode == 1
    assert 'allowed_uids: no such user "no-such-user-here"' in p.stderr


# ---- limits -------------------------------------------------------------------------------------

def test_hello_and_frame_timeouts(pg, db, tmp_path, artifact_root):
    a = start_agent(pg, db, tmp_path, artifact_root, "hello_timeout_ms = 300\nframe_timeout_ms = 300\n")
    try:
        silent = Raw(a.socket)  # never says hello
        seq, code, msg = read_error(silent)
        assert code == 30 and "no hello within 300 ms" in msg
        assert closed(silent)
        slow = Raw(a.socket)
        slow.hello()
        whole = frame("metrics", ["a" * 32, ["m", 1.0, TS0, 0]], seq=2)
        slow.send(whole[:20])  # the header and four bytes, then nothing
        seq, code, msg = read_error(slow)
        assert code == 30 and "a frame still incomplete after 300 ms (20 bytes" in msg
        assert closed(slow)
        st = a.stats()
        assert (st["timeouts_hello"], st["timeouts_frame"]) == (1, 1)
        log = a.log()
        assert "no hello within 300 ms ([agent] hello_timeout_ms); closing" in log
        assert "frame_timeout_ms); closing" in log
    finally:
        assert a.stop() == 0


def test_idle_timeout(pg, db, tmp_path, artifact_root):
    a = start_agent(pg, db, tmp_path, artifact_root, "idle_timeout_ms = 300\n")
    try:
        r = Raw(a.socket)
        r.hello()
        _, code, msg = read_error(r)
        assert code == 30 and "idle for 300 ms" in msg
        assert closed(r)
        assert a.stats()["timeouts_idle"] == 1
        # The shim reconnects by itself: a client that logs after the close loses nothing.
        out, _ = run_driver(a.socket, [["run", "r", "idle-exp", "", "now"], ["metric", "r", "m", "1", "0", str(TS0)],
                                       ["flush", "30000"]])
        assert ["flush", "0"] in out
    finally:
        assert a.stop() == 0


def test_frame_rate_slows_a_client_without_losing_frames(pg, db, tmp_path, artifact_root):
    a = start_agent(pg, db, tmp_path, artifact_root, "max_frames_per_sec = 200\n")
    try:
        good = run_driver(a.socket, [["run", "r", "rate-exp", "", "now"]])[0]
        run_id = driver_runs(good)["r"]
        r = Raw(a.socket, timeout=30)
        r.hello()
        n = 600
        r.send(b"".join(frame("metrics", [run_id, ["m", float(i), TS0, i]], seq=2 + i) for i in range(n)))
        r.send(frame("flush", [], seq=2 + n))
        kind, _, _ = r.read()
        assert kind == KINDS["flushed"]
        r.close()
        assert pg.query(db, "SELECT count(*) FROM metrics WHERE run_uuid = %s", (run_id,)) == [(n,)]
        # 601 frames at 200 per window: held back at least twice, never dropped.
        assert a.stats()["rate_limited"] >= 2
        assert "max_frames_per_sec); reading it more slowly" in a.log()
    finally:
        assert a.stop() == 0


def test_client_that_never_reads_its_replies(pg, db, tmp_path, artifact_root):
    a = start_agent(pg, db, tmp_path, artifact_root, "max_reply_bytes = 65536\n")
    try:
        r = Raw(a.socket)
        r.hello()
        r.s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        try:
            for i in range(4000):  # each STATS reply is about 2 KiB; never read
                r.send(frame("stats", [], seq=2 + i))
        except (BrokenPipeError, ConnectionResetError):
            pass
        wait_for(lambda: a.stats()["closed_slow_reader"] == 1, 30, "the agent to drop the non-reader")
        assert "does not read its replies" in a.log() and "max_reply_bytes = 65536" in a.log()
        r.close()
        # Everyone else is still served.
        out, _ = run_driver(a.socket, [["run", "r", "slow-exp", "", "now"], ["flush", "30000"]])
        assert ["flush", "0"] in out
    finally:
        assert a.stop() == 0


def test_incomplete_frames_share_one_memory_budget(pg, db, tmp_path, artifact_root):
    a = start_agent(pg, db, tmp_path, artifact_root,
                    "max_read_buffer_bytes = 1048576\nmax_frame_bytes = 1048576\n")
    try:
        clients = []
        for i in range(6):  # each holds ~300 KB of a 900 KB frame: the fourth passes the budget
            r = Raw(a.socket)
            r.hello()
            r.send(b"TK\x01\x06" + struct.pack(">IQ", 900_000, 2) + b"\x00" * 300_000)
            clients.append(r)
        wait_for(lambda: a.stats()["closed_read_memory"] >= 1, 30, "the oldest partial frame to be shed")
        st = a.stats()
        assert st["read_buffer_bytes"] <= 1048576
        assert closed(clients[0])  # the oldest went first
        assert "max_read_buffer_bytes = 1048576), the most of them this uid's; closing its " \
               "oldest" in a.log()
        for r in clients:
            r.close()
    finally:
        assert a.stop() == 0


def test_clients_that_only_said_hello_hold_no_read_buffer(pg, db, tmp_path, artifact_root):
    """Twenty clients that said hello and stay quiet would hold 1.25 MiB of 64 KiB read buffers,
    over a 1 MiB budget for incomplete frames, if they kept them: the agent gives each back
    once the hello is read, so a client with a partial frame within the budget is not closed
    for it, and its frame completes."""
    a = start_agent(pg, db, tmp_path, artifact_root,
                    "max_read_buffer_bytes = 1048576\nframe_timeout_ms = 30000\n")
    try:
        idle = []
        for _ in range(20):
            r = Raw(a.socket)
            r.hello()
            idle.append(r)
        slow = Raw(a.socket)
        slow.hello()
        whole = frame("flush", [], seq=2)
        slow.send(whole[:10])  # part of the header: an incomplete frame
        wait_for(lambda: a.stats()["read_buffer_bytes"] <= 1048576, 30,
                 "the read buffers to fit the budget")
        st = a.stats()
        assert st["closed_read_memory"] == 0, st
        # The slow client's chunk, and the stats request's own connection.
        assert st["read_buffer_bytes"] <= 2 * 65536, st
        slow.send(whole[10:])
        kind, _, _ = slow.read()
        assert kind == KINDS["flushed"]
        for r in idle + [slow]:
            r.close()
    finally:
        assert a.stop() == 0


# ---- malformed input --------------------------------------------------------------------------

def test_deep_nesting_and_truncated_frames(pg, db, agent):
    r = Raw(agent.socket)
    r.hello()
    r.send(frame("flush", b"\x91" + b"\x91" * 64 + b"\xc0", seq=2))
    _, code, msg = read_error(r)
    assert code == 30 and "nesting too deep" in msg
    assert closed(r)
    # A frame cut short by the client's own close costs only that connection.
    t = Raw(agent.socket)
    t.hello()
    t.send(frame("metrics", ["a" * 32, ["m", 1.0, TS0, 0]], seq=2)[:25])
    t.close()
    wait_for(lambda: "closed mid-frame" in agent.log(), 10, "the agent to notice the cut frame")
    assert agent.stats()["closed_mid_frame"] == 1


# ---- everything at once -------------------------------------------------------------------------

BAD_CAUSES = {
    # name: (bytes sent after connecting, whether hello comes first, the counter it lands in)
    "garbage": (b"\x00\xffgarbage" * 4, False, "rejected_protocol"),
    "bad-magic": (b"XX\x01\x06" + b"\x00" * 12, True, "rejected_protocol"),
    "bad-version": (frame("metrics", [], version=9), True, "rejected_protocol"),
    "unknown-kind": (b"TK\x01\x63" + b"\x00" * 12, True, "rejected_protocol"),
    "1GiB-length": (b"TK\x01\x06" + struct.pack(">IQ", 1 << 30, 2), True, "rejected_protocol"),
    "deep-nesting": (frame("flush", b"\x91" * 65 + b"\xc0", seq=2), True, "rejected_protocol"),
    "wrong-types": (frame("metrics", ["a" * 32, "not a list"], seq=2), True, "rejected_protocol"),
    "truncated": (frame("metrics", ["a" * 32, ["m", 1.0, TS0, 0]], seq=2)[:30], True, "closed_mid_frame"),
    "no-hello": (b"", False, "timeouts_hello"),
    "slowloris": (b"TK\x01\x06" + struct.pack(">IQ", 5000, 2) + b"\x00" * 10, True, "timeouts_frame"),
    "never-reads": (b"".join(frame("stats", [], seq=2 + i) for i in range(3000)), True, "closed_slow_reader"),
}
PER_CAUSE = 10
IDLE = 1000


def test_idle_connections_and_a_flood_of_bad_clients(pg, db, tmp_path, artifact_root):
    """1,000 idle clients and 110 bad ones (10 of each cause) while a good client logs 100,000
    points: every point lands, every bad client is counted under its cause, and the agent's
    memory stays within its configured budgets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 4096:
        pytest.skip(f"needs 4096 descriptors, the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 4096), hard))  # the agent inherits it
    a = start_agent(pg, db, tmp_path, artifact_root,
                    "max_connections = 1200\nmax_connections_per_uid = 1200\n"
                    "hello_timeout_ms = 500\nframe_timeout_ms = 500\n"
                    "max_reply_bytes = 65536\n")
    try:
        before = a.stats()
        base_rss = vm(a.proc.pid, "VmRSS")
        idle = []
        for _ in range(IDLE):
            r = Raw(a.socket)
            r.hello()
            idle.append(r)
        good = subprocess.Popen([str(BUILD / "trackd-driver"), "--socket", a.socket], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)
        good.stdin.write("run\tr\tflood-exp\tgood\tnow\ngen\tr\t50\t2000\t%d\n" % TS0)
        good.stdin.close()
        bad = []
        for name, (data, hello, _) in BAD_CAUSES.items():
            for _ in range(PER_CAUSE):
                r = Raw(a.socket, timeout=30)
                if hello:
                    r.hello()
                if name == "never-reads":
                    r.s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                try:
                    if data:
                        r.send(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass
                if name == "truncated":
                    r.close()
                else:
                    bad.append(r)
        out = good.stdout.read().splitlines()
        assert good.wait(600) == 0
        gen = next(l.split("\t") for l in out if l.startswith("gen\t"))
        fields = dict(x.split("=") for x in gen[2:])
        assert fields["flush"] == "0" and fields["dropped"] == "0", gen
        run_id = next(l.split("\t")[2] for l in out if l.startswith("run\t"))
        assert pg.query(db, "SELECT count(*) FROM metrics WHERE run_uuid = %s", (run_id,)) == [(100_000,)]

        want = {}
        for _, (_, _, counter) in BAD_CAUSES.items():
            want[counter] = want.get(counter, 0) + PER_CAUSE

        def counted():
            st = a.stats()
            return all(st[k] - before[k] >= v for k, v in want.items())
        wait_for(counted, 60, "every bad client to be counted under its cause")
        st = a.stats()
        got = {k: st[k] - before[k] for k in want}
        print(f"\nscenario=hostile-flood idle={IDLE} bad={len(BAD_CAUSES) * PER_CAUSE} good_points=100000 "
              + " ".join(f"{k}={v}" for k, v in sorted(got.items())))
        assert got == want, got
        assert st["connections_current"] >= IDLE  # the idle clients were never dropped
        assert st["read_buffer_bytes"] <= 64 << 20
        peak = vm(a.proc.pid, "VmHWM")
        growth = peak - base_rss
        print(f"agent RSS at start {base_rss >> 20} MiB, peak {peak >> 20} MiB")
        if not SANITIZED:  # ASan's shadow memory and quarantine are not the agent's
            # Budgets: incomplete frames 64 MiB + pending events 20 MiB (24 allowed) + replies
            # and connection state (1,200 x 64 KiB) = 163 MiB.
            assert growth <= 163 << 20, f"RSS grew {growth >> 20} MiB"
        for r in idle + bad:
            r.close()
    finally:
        assert a.stop() == 0


def test_frames_held_behind_an_artifact_do_not_count_as_incomplete(pg, db, tmp_path, artifact_root):
    """Frames that arrive with an ARTIFACT wait, complete, while the file is copied; once they
    are dispatched, a client that then stays quiet for longer than frame_timeout_ms is not a
    slow sender."""
    a = start_agent(pg, db, tmp_path, artifact_root, "frame_timeout_ms = 300\n")
    try:
        out, _ = run_driver(a.socket, [["run", "r", "held-exp", "held", "now"], ["flush", "10000"]])
        run_id = driver_runs(out)["r"]
        data = tmp_path / "a.bin"
        data.write_bytes(os.urandom(4 << 20))
        r = Raw(a.socket)
        r.hello()
        with open(data, "rb") as f:
            r.send_with_fds(frame("artifact", [run_id, "a.bin", 4 << 20], seq=2)
                            + frame("metrics", [run_id, ["m", 1.0, TS0, 0]], seq=3), [f.fileno()])
        # No further byte: the point is written once the copy is in the spool.
        wait_for(lambda: a.stats()["metrics_committed"] >= 1, 30, "the held point to be written")
        # Quiet for more than three frame timeouts (the sweep runs every 100 ms).
        start = a.stats()["uptime_s"]
        wait_for(lambda: a.stats()["uptime_s"] >= start + 2, 30, "two seconds of agent uptime")
        assert a.stats()["timeouts_frame"] == 0
        r.send(frame("flush", [], seq=4))
        kind, _, _ = r.read()
        assert kind == KINDS["flushed"]  # still served on the same connection
        r.close()
        assert pg.query(db, "SELECT count(*) FROM metrics WHERE run_uuid = %s", (run_id,)) == [(1,)]
    finally:
        assert a.stop() == 0
