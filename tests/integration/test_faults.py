"""Fault scenarios with exact accounting: what clients sent equals what PostgreSQL holds,
with no duplicates, across real crashes of real processes."""
import os
import signal
import subprocess

from harness import BUILD, Agent, wait_for

TS0 = 1_700_000_000_000


def report(scenario, sent, committed, duplicates, dead_lettered=0, dropped=0):
    print(f"\nscenario={scenario} sent={sent} committed={committed} duplicates={duplicates} "
          f"dead-lettered={dead_lettered} dropped={dropped}")


def test_agent_kill9_mid_stream_then_restart(pg, db, tmp_path):
    """b) The agent is killed with SIGKILL while a client streams; a new agent on the same
    socket and journal replays what was journaled, the client resends what was not
    acknowledged, and every point lands exactly once."""
    a = Agent(pg, db, tmp_path / "a").start()
    keys, steps = 10, 5000
    p = subprocess.Popen([str(BUILD / "trackd-driver"), "--socket", a.socket],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
    p.stdin.write("run\tr\tkill-exp\tk\tnow\n")
    p.stdin.flush()
    run_id = p.stdout.readline().split("\t")[2].strip()
    p.stdin.write(f"gen\tr\t{keys}\t{steps}\t{TS0}\n")
    p.stdin.flush()
    # Kill once some points are committed and more are in flight.
    wait_for(lambda: pg.query(db, "SELECT count(*) FROM metrics WHERE run_uuid = %s",
                              (run_id,))[0][0] > 0, 60, "the first committed points")
    os.kill(a.proc.pid, signal.SIGKILL)
    a.proc.wait()
    b = Agent(pg, db, tmp_path / "a")  # same socket, same journal directory
    b.start()
    try:
        gen = p.stdout.readline().rstrip("\n").split("\t")
        p.stdin.write("counters\n")
        p.stdin.flush()
        counters = p.stdout.readline()
        p.stdin.close()
        assert p.wait(60) == 0
        assert gen[0] == "gen" and "flush=0" in gen and "dropped=0" in gen, gen
        sent = keys * steps
        rows, distinct = pg.query(
            db, "SELECT count(*), count(DISTINCT (key, step)) FROM metrics WHERE run_uuid = %s",
            (run_id,))[0]
        report("agent-kill-9", sent, rows, rows - distinct)
        assert rows == distinct == sent
        assert "lost=0" in counters, counters
        latest = pg.query(db, "SELECT count(*), min(step), max(step) FROM latest_metrics"
                              " WHERE run_uuid = %s", (run_id,))
        assert latest == [(keys, steps - 1, steps - 1)]
        st = b.stats()
        assert st["replayed_frames"] + st["duplicates_dropped"] > 0 or st["metrics_committed"] > 0
    finally:
        assert b.stop() == 0
    # The journal is emptied once everything is committed.
    leftovers = [f for f in os.listdir(tmp_path / "a" / "journal") if f.endswith(".tjl")]
    assert len(leftovers) <= 1


def test_journal_commands_report_the_journal(pg, db, tmp_path):
    """`trackd journal status|verify` on a live journal, then on a damaged one."""
    a = Agent(pg, db, tmp_path / "a").start()
    try:
        p = subprocess.run([str(BUILD / "trackd-driver"), "--socket", a.socket],
                           input=f"run\tr\tj-exp\tj\tnow\ngen\tr\t5\t1000\t{TS0}\n",
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stdout + p.stderr
    finally:
        assert a.stop() == 0
    jdir = tmp_path / "a" / "journal"
    # A clean stop leaves nothing to replay: committed records are never applied again.
    again = Agent(pg, db, tmp_path / "a").start()
    try:
        assert again.stats()["replayed_frames"] == 0
    finally:
        assert again.stop() == 0
    status = subprocess.run([str(BUILD / "trackd"), "journal", "status", str(jdir)],
                            capture_output=True, text=True)
    assert status.returncode == 0, status.stderr
    assert "segment" in status.stdout
    ok = subprocess.run([str(BUILD / "trackd"), "journal", "verify", str(jdir)],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    seg = next(f for f in os.listdir(jdir) if f.endswith(".tjl"))
    with open(jdir / seg, "ab") as f:
        f.write(b"\x01" * 100)  # garbage after the last block: not zeros, so not a torn tail
    bad = subprocess.run([str(BUILD / "trackd"), "journal", "verify", str(jdir)],
                         capture_output=True, text=True)
    assert bad.returncode == 1, bad.stdout
