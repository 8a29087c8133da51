"""Acknowledged means delivered, exactly once: one agent per journal, a crash between COMMIT
and the journal's marker, and a journal disk that fills up."""
import os
import signal
import subprocess
import time

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
        s.send("run", "r", "lock-exp", "l", "now")
        run_id = s.read("run")[2]
        s.send("flush", 30000)
        assert s.read("flush") == ["flush", "0"]
        pg.pause()
        paused = True
        points = 3000
        for i in range(points):
            s.send("metric", "r", "loss", i, i, TS0 + i)
        wait_for(lambda: a.stats()["journal_records"] >= 3, 60, "the points to be journaled")

        b = Agent(pg, db, tmp_path / "b")
        b.config.write_text(b.config.read_text().replace(str(tmp_path / "b" / "journal"),
                                                         str(journal)))
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
    s.send("run", "r", "exactly-once-exp", "e", "now")
    run_id = s.read("run")[2]
    s.send("flush", 30000)
    assert s.read("flush") == ["flush", "0"]
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
    committed_before = pg.query(db, "SELECT count(*) FROM metrics WHERE run_uuid = %s",
                                (run_id,))[0][0]
    assert committed_before > 0
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


def cpu_seconds(pid):
    """User + system CPU time of a process so far, from /proc/PID/stat."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.fixture
def small_fs(tmp_path):
    """A 16 MiB tmpfs, mounted for the test (root only)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "small-fs"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m,mode=0755", "tmpfs", str(mnt)],
                   check=True)
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
    a = Agent(pg, db, tmp_path / "a")
    a.config.write_text(a.config.read_text().replace(str(tmp_path / "a" / "journal"),
                                                     str(small_fs / "journal")))
    a.start()
    s = Streamer(a.socket)
    try:
        s.send("run", "r", "disk-full-exp", "d", "now")
        run_id = s.read("run")[2]
        s.send("flush", 30000)
        assert s.read("flush") == ["flush", "0"]
        filler = small_fs / "filler"
        fill(filler)
        points = 2000
        for i in range(points):
            s.send("metric", "r", "loss", i, i, TS0 + i)
        wait_for(lambda: a.stats()["journal_full"] >= 1, 60, "the journal write to fail")
        cpu0, t0 = cpu_seconds(a.proc.pid), time.monotonic()
        deadline = t0 + FULL_SECONDS
        while time.monotonic() < deadline:
            time.sleep(1)  # the measurement window itself, not a synchronisation
        cpu = (cpu_seconds(a.proc.pid) - cpu0) / (time.monotonic() - t0)
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
