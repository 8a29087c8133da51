"""Acknowledged means delivered, exactly once: one agent per journal, a crash between COMMIT
and the journal's marker, and a journal disk that fills up."""
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from harness import BUILD, Agent, Streamer, count, report, wait_for

TS0 = 1_700_000_000_000


def test_second_agent_on_a_journal_is_refused(pg, db, tmp_path):
    """A second agent on a journal directory in use exits non-zero naming the directory and
    the holder's pid; the first one's acknowledged points all arrive, even after it is killed
    and restarted while PostgreSQL was down."""
    a = Agent(pg, db, tmp_path / "a").start()
    journal = tmp_path / "a" / "journal"
    s = Streamer(a.socket)
    paused = False
    try:
        run_id = s.start_run("lock-exp", "l")
        journaled = a.stats()["journal_records"]
        pg.pause()
        paused = True
        points = 3000
        for i in range(points):
            s.send("metric", "r", "loss", i, i, TS0 + i)
        # The client packs consecutive points of a run into few frames: one new record will do.
        wait_for(lambda: a.stats()["journal_records"] > journaled, 60, "the points to be journaled")

        b = Agent(pg, db, tmp_path / "b", journal_dir=journal)
        b.start(wait=False)
        assert b.proc.wait(30) == 1
        assert (f"the journal directory {journal} is in use by another trackd agent "
                f"(pid {a.proc.pid})") in b.log(), b.log()
        assert "[agent] ready" not in b.log()
        assert (journal / "lock").read_text() == f"{a.proc.pid}\n"

        # Acknowledged while the database was down, then the agent dies: all of it arrives.
        os.kill(a.proc.pid, signal.SIGKILL)
        a.proc.wait()
        pg.resume()
        paused = False
        a.start()
        s.send("flush", 120000)
        assert s.read("flush") == ["flush", "0"]
        counters = s.finish()
        rows, distinct = count(pg, db, run_id)
        report("second-agent-refused", points, rows, rows - distinct,
               dropped=int(counters["dropped"]) + int(counters["lost"]))
        assert rows == distinct == points
    finally:
        if paused:
            pg.resume()
        assert a.stop() == 0


def test_crash_between_commit_and_marker_applies_nothing_twice(pg, db, tmp_path):
    """The agent dies right after a COMMIT, before the journal learns of it (a test-only fault
    point). Meanwhile another client changes the tag that transaction set. The replay skips
    what the progress row in PostgreSQL says is committed: the newer tag survives and no
    point is written twice."""
    a = Agent(pg, db, tmp_path / "a").start()
    s = Streamer(a.socket)
    run_id = s.start_run("exactly-once-exp", "e")
    assert a.stop() == 0

    a.command = ["env", "TRACKD_TEST_EXIT_AFTER_COMMITS=1", str(BUILD / "trackd")]
    a.start()
    points = 50
    s.send("tag", "r", "stage", "from-the-crashed-agent")
    for i in range(points):
        s.send("metric", "r", "loss", i, i, TS0 + i)
    s.send("flush", 5000)
    assert a.proc.wait(60) == 86
    assert "exiting after a COMMIT" in a.log()
    # The first COMMIT holds the tag, and the points that came in the same batch (all, some or
    # none of them, as the batch was cut): the tag is what the replay must not apply again.
    assert pg.query(db, "SELECT value FROM tags WHERE run_uuid = %s AND key = 'stage'",
                    (run_id,)) == [("from-the-crashed-agent",)]
    # Another client changes the tag while the agent is down.
    pg.query(db, "UPDATE tags SET value = 'changed-since' WHERE run_uuid = %s"
                 " AND key = 'stage' RETURNING 1", (run_id,))

    a.command = [str(BUILD / "trackd")]
    a.start()
    try:
        s.send("flush", 60000)
        flushed = s.read("flush")
        counters = s.finish()
        st = a.stats()
        rows, distinct = count(pg, db, run_id)
        tag = pg.query(db, "SELECT value FROM tags WHERE run_uuid = %s AND key = 'stage'",
                       (run_id,))
        report("crash-between-commit-and-marker", points, rows, rows - distinct,
               dropped=int(counters["dropped"]) + int(counters["lost"]),
               reapplied=0 if tag == [("changed-since",)] else 1,
               skipped_at_replay=st["replay_skipped_committed"])
        assert rows == distinct == points
        assert tag == [("changed-since",)]
        assert st["replayed_frames"] >= 1 and st["replay_skipped_committed"] >= 1, st
        assert "is committed up to record" in a.log()
        assert flushed[0] == "flush"
        (progress,) = pg.query(db, "SELECT count(*) FROM trackd_journal_progress")
        assert progress == (1,)
    finally:
        assert a.stop() == 0


def start_runs(s, n, experiment):
    """Starts n runs with new ids as aliases r0 .. r<n-1> of Streamer s, committed; their ids."""
    ids = [uuid.uuid4().hex for _ in range(n)]
    for k, run_id in enumerate(ids):
        s.send("runid", f"r{k}", run_id, experiment, f"r{k}", "now")
        s.read("run")
    s.send("flush", 30000)
    assert s.read("flush") == ["flush", "0"]
    return ids


def test_changing_the_writer_count_loses_nothing(pg, db, tmp_path):
    """Each writer connection records its own journal progress, keyed by the count. An agent
    that dies after one of two writers committed, restarted with one writer, then killed with
    nothing committed and restarted with three, writes every point of both runs: a count change
    only ever writes events again (idempotently), never skips one another writer had not
    committed."""
    a = Agent(pg, db, tmp_path / "a").start()
    s = Streamer(a.socket)
    ids = start_runs(s, 2, "writer-count-exp")
    assert a.stop() == 0

    # Two writers; the process exits right after the first COMMIT, which is writer 1's: r1's
    # first point reaches the new agent first, so r1 goes to writer 0, which waits for a lock
    # another session holds on r1, so its events stay uncommitted, below the record writer 1's
    # progress row names.
    a.command = ["env", "TRACKD_TEST_EXIT_AFTER_COMMITS=1", str(BUILD / "trackd")]
    a.start()
    points = 0
    with pg.connect(db) as lock:
        lock.execute("BEGIN")
        lock.execute("SELECT 1 FROM runs WHERE run_uuid = %s FOR UPDATE", (ids[1],))
        for step in range(300):
            for k in (1, 0):
                s.send("metric", f"r{k}", "loss", step, step, TS0 + step)
            points += 1
        s.send("flush", 5000)
        assert a.proc.wait(60) == 86
    assert count(pg, db, ids[1]) == (0, 0)

    # One writer: its progress row (the journal id alone) is not the two writers' rows.
    a.command = ["env", "TRACKD_POSTGRES_WRITER_CONNECTIONS=1", str(BUILD / "trackd")]
    a.start()
    s.send("flush", 60000)
    assert s.read("flush")[:2] in (["flush", "0"], ["flush", "-110"])  # the one sent before
    s.send("flush", 60000)
    assert s.read("flush") == ["flush", "0"]
    for run_id in ids:
        assert count(pg, db, run_id) == (points, points)
    assert "[writer 1]" not in a.log().split("[agent] ready")[-1]

    # Killed with points journaled and none committed, restarted with three writers.
    pg.pause()
    try:
        for step in range(300, 600):
            for k in range(2):
                s.send("metric", f"r{k}", "loss", step, step, TS0 + step)
            points += 1
        wait_for(lambda: a.stats()["events_received"] >= 600, 30, "the points to reach the agent")
        a.kill()
    finally:
        pg.resume()
    a.command = ["env", "TRACKD_POSTGRES_WRITER_CONNECTIONS=3", str(BUILD / "trackd")]
    a.start()
    s.send("flush", 60000)
    assert s.read("flush") == ["flush", "0"]
    counters = s.finish()
    for run_id in ids:
        assert count(pg, db, run_id) == (points, points)
    assert "[writer 2] connected to PostgreSQL" in a.log()
    keys = {k for (k,) in pg.query(db, "SELECT journal_id FROM trackd_journal_progress")}
    assert any(k.endswith("/1/3") or k.endswith("/0/3") or k.endswith("/2/3") for k in keys), keys
    report("writer-count-change", 2 * points, 2 * points, 0,
           dropped=int(counters["dropped"]) + int(counters["lost"]))
    assert a.stop() == 0


def test_replay_sends_each_record_to_its_writer(pg, db, tmp_path):
    """Runs go to the least-loaded writer connection, so which one a run takes depends on what
    else is going on. A replay must send each record to the writer it went to before the crash:
    that writer's progress row is what says whether the record is committed. Here r1's points
    went to writer 1 (writer 0 had r0) and wait there for a lock; r2's went to writer 0 and
    commit, moving writer 0's row past r1's points. Routed afresh at replay, r1 would go to
    writer 0 (r1's records are the first left) and be skipped as committed."""
    a = Agent(pg, db, tmp_path / "a").start()
    s = Streamer(a.socket)
    ids = start_runs(s, 3, "replay-route-exp")
    wait_for(lambda: a.stats()["runs_on_writers"] == 0, 30, "the runs' routes to be dropped")

    points = 300
    try:
        with pg.connect(db) as lock:
            lock.execute("BEGIN")
            lock.execute("SELECT 1 FROM runs WHERE run_uuid = %s FOR UPDATE", (ids[1],))
            # r0 takes writer 0 (and is committed at once), r1 then writer 1, r2 writer 0 again
            # (one run each, and writer 0 has fewer events waiting).
            s.send("metric", "r0", "loss", 0, 0, TS0)
            for k in (1, 2):
                for step in range(points):
                    s.send("metric", f"r{k}", "loss", step, step, TS0 + step)
            wait_for(lambda: count(pg, db, ids[2]) == (points, points) and
                     count(pg, db, ids[0]) == (1, 1), 60, "r0's and r2's points to commit")
            a.kill()
    finally:
        a.kill()
    assert count(pg, db, ids[1]) == (0, 0)

    a.start()
    try:
        s.send("flush", 60000)
        assert s.read("flush") == ["flush", "0"]
        counters = s.finish()
        st = a.stats()
        rows = count(pg, db, ids[1])
        report("replay-to-the-same-writer", points, rows[0], rows[0] - rows[1],
               dropped=int(counters["dropped"]) + int(counters["lost"]),
               skipped_at_replay=st["replay_skipped_committed"])
        assert rows == (points, points)
        assert count(pg, db, ids[2]) == (points, points)
        assert count(pg, db, ids[0]) == (1, 1)
        # r2's points were replayed too, and skipped: writer 0's row covers them.
        assert st["replay_skipped_committed"] >= points, st
    finally:
        assert a.stop() == 0


def cpu_seconds(pid):
    """User + system CPU time of a process so far, from /proc/PID/stat."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_share(pid, seconds):
    """The share of one core pid uses over the next seconds (a measurement window, not a
    synchronisation)."""
    cpu0, t0 = cpu_seconds(pid), time.monotonic()
    time.sleep(seconds)
    return (cpu_seconds(pid) - cpu0) / (time.monotonic() - t0)


@pytest.fixture
def small_fs(tmp_path):
    """A 16 MiB tmpfs, mounted for the test (root only)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "small-fs"
    mnt.mkdir()
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m,mode=0755", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if p.returncode != 0:  # a container without CAP_SYS_ADMIN
        pytest.skip(f"cannot mount a tmpfs here: {p.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(path):
    """Writes path until the file system is full; returns the bytes written."""
    chunk = b"\0" * (1 << 20)
    written = 0
    with open(path, "wb", buffering=0) as f:
        while True:
            try:
                written += f.write(chunk if written % (1 << 20) == 0 else chunk[:4096])
            except OSError as e:
                if e.errno != 28:
                    raise
                if len(chunk) == 4096:
                    return written
                chunk = chunk[:4096]


FULL_SECONDS = 60


def test_full_journal_disk_waits_without_spinning(pg, db, tmp_path, small_fs):
    """The journal's file system fills up while a client logs: the agent stops reading
    clients, retries the write with backoff (under 5% of a core for 60 s), counts it, and
    commits everything by itself once space returns."""
    a = Agent(pg, db, tmp_path / "a", journal_dir=small_fs / "journal").start()
    s = Streamer(a.socket)
    try:
        run_id = s.start_run("disk-full-exp", "d")
        filler = small_fs / "filler"
        fill(filler)
        points = 2000
        for i in range(points):
            s.send("metric", "r", "loss", i, i, TS0 + i)
        wait_for(lambda: a.stats()["journal_full"] >= 1, 60, "the journal write to fail")
        cpu = cpu_share(a.proc.pid, FULL_SECONDS)
        st = a.stats()
        assert st["journal_write_errors"] <= 40, st
        assert "the file system is full" in a.log()
        filler.unlink()
        s.send("flush", 120000)
        assert s.read("flush") == ["flush", "0"]
        counters = s.finish()
        rows, distinct = count(pg, db, run_id)
        report("disk-full-60s", points, rows, rows - distinct,
               dropped=int(counters["dropped"]) + int(counters["lost"]),
               cpu_while_full=f"{cpu * 100:.2f}%", write_attempts=st["journal_write_errors"])
        assert cpu < 0.05, f"{cpu * 100:.1f}% of a core while the disk was full"
        assert rows == distinct == points
        assert "writing works again" in a.log()
    finally:
        assert a.stop() == 0


def test_full_spool_disk_waits_for_room(pg, db, tmp_path, small_fs):
    """The artifact spool's file system is full when a client logs a checkpoint: the snapshot
    waits (its client's connection with it) and is retried with backoff, not refused; once
    space returns, the file is stored byte for byte and flush() returns."""
    a = Agent(pg, db, tmp_path / "a", artifact_root=str(tmp_path / "store"),
              journal_dir=small_fs / "journal").start()
    ckpt = tmp_path / "ckpt.bin"
    data = os.urandom(2 << 20)  # above the size the client copies at the call
    ckpt.write_bytes(data)
    s = Streamer(a.socket)
    try:
        run_id = s.start_run("spool-full-exp", "s")
        filler = small_fs / "filler"
        fill(filler)
        s.send("artifact", "r", str(ckpt), "ckpt")
        assert s.read("artifact") == ["artifact", "0"]
        s.send("flush", 120000)
        wait_for(lambda: a.stats()["artifact_spool_full"] >= 1, 60, "the spool to be full")
        wait_for(lambda: "has no room for ckpt/ckpt.bin" in a.log(), 30, "the log line")
        cpu = cpu_share(a.proc.pid, 10)
        st = a.stats()
        assert st["artifacts_received"] == 0 and st["artifacts_failed"] == 0, st
        filler.unlink()
        assert s.read("flush") == ["flush", "0"]
        s.send("errors")
        counters = s.finish()
        (uri,) = pg.query(db, "SELECT artifact_uri FROM runs WHERE run_uuid = %s", (run_id,))[0]
        stored = Path(uri.removeprefix("file://")) / "ckpt" / "ckpt.bin"
        ok = stored.read_bytes() == data
        report("spool-full", 1, int(ok), 0, dropped=int(counters["dropped"]),
               cpu_while_full=f"{cpu * 100:.2f}%")
        assert ok
        assert counters["errors"] == "0", counters
        assert cpu < 0.05, f"{cpu * 100:.1f}% of a core while the spool was full"
        assert "the spool has room again" in a.log()
    finally:
        assert a.stop() == 0
