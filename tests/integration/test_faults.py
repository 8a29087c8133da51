"""Fault scenarios with exact accounting: what clients sent equals what PostgreSQL holds,
with no duplicates, across real crashes of real processes."""
import os
import time
import signal
import subprocess

from harness import BUILD, Agent, Streamer, count, report, run_driver, wait_for

TS0 = 1_700_000_000_000


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


def test_postgres_outage_mid_stream(pg, db, tmp_path):
    """a) PostgreSQL stops for 30 s while a client streams; the agent keeps accepting into
    its journal, reconnects with backoff, and drains when the database returns."""
    a = Agent(pg, db, tmp_path / "a").start()
    s = Streamer(a.socket)
    try:
        s.send("run", "r", "outage-exp", "o", "now")
        run_id = s.read("run")[2]
        s.send("flush", 30000)
        assert s.read("flush") == ["flush", "0"]
        pg.pause()
        t_end = time.monotonic() + 30
        keys, steps = 10, 3000
        s.send("gen", "r", keys, steps, TS0)  # logs while the database is down, then waits
        wait_for(lambda: a.stats()["journal_records"] > 0 and a.stats()["db_retries"] > 0, 30,
                 "the agent to journal and retry")
        wait_for(lambda: time.monotonic() > t_end, 40, "the 30 s outage")
        pg.resume()
        gen = s.read("gen")
        counters = s.finish()
        assert "flush=0" in gen, gen
        rows, distinct = count(pg, db, run_id)
        report("postgres-outage-30s", keys * steps, rows, rows - distinct,
               dropped=int(counters["dropped"]) + int(counters["lost"]))
        assert rows == distinct == keys * steps
        assert counters["dropped"] == "0" and counters["lost"] == "0"
    finally:
        assert a.stop() == 0


def test_sigterm_under_load_then_restart(pg, db, tmp_path):
    """h) SIGTERM while a client streams: the agent stops reading, drains what it can within
    its grace, exits 0 and keeps the rest in the journal; the next start finishes the job."""
    a = Agent(pg, db, tmp_path / "a", extra="").start()
    s = Streamer(a.socket)
    s.send("run", "r", "term-exp", "t", "now")
    run_id = s.read("run")[2]
    keys, steps = 10, 5000
    s.send("gen", "r", keys, steps, TS0)
    wait_for(lambda: count(pg, db, run_id)[0] > 0, 60, "the first committed points")
    assert a.stop() == 0
    b = Agent(pg, db, tmp_path / "a").start()
    try:
        gen = s.read("gen")
        counters = s.finish()
        rows, distinct = count(pg, db, run_id)
        report("sigterm-under-load", keys * steps, rows, rows - distinct,
               dropped=int(counters["dropped"]) + int(counters["lost"]))
        assert "flush=0" in gen, gen
        assert rows == distinct == keys * steps
    finally:
        assert b.stop() == 0


def test_client_killed_mid_frame_others_unaffected(pg, db, agent):
    """c) A client dies halfway through a frame while another logs: the partial frame is
    dropped with a log line, the other client's points all land."""
    from rawproto import Raw, frame

    good = Streamer(agent.socket)
    good.send("run", "g", "mid-exp", "g", "now")
    run_id = good.read("run")[2]
    raw = Raw(agent.socket)
    raw.hello()
    data = frame("metrics", [run_id, ["half", 1.0, TS0, 0]], seq=5)
    raw.send(data[: len(data) // 2])
    good.send("gen", "g", 5, 2000, TS0)
    raw.close()  # dies mid-frame
    gen = good.read("gen")
    counters = good.finish()
    rows, distinct = count(pg, db, run_id)
    report("client-killed-mid-frame", 5 * 2000, rows, rows - distinct,
           dropped=int(counters["dropped"]) + int(counters["lost"]))
    assert "flush=0" in gen and rows == distinct == 10_000
    assert pg.query(db, "SELECT count(*) FROM metrics WHERE key = 'half'") == [(0,)]
    wait_for(lambda: "closed mid-frame" in agent.log(), 10, "the partial frame to be logged")


def test_poison_rows_are_dead_lettered(pg, db, agent):
    """f) Bad keys and a run deleted underneath: exactly those events go to the dead-letter
    file and the client's errors; every good point commits."""
    s = Streamer(agent.socket)
    s.send("run", "a", "poison-exp", "a", "now")
    run_a = s.read("run")[2]
    s.send("run", "b", "poison-exp", "b", "now")
    run_b = s.read("run")[2]
    s.send("flush", 30000)
    assert s.read("flush") == ["flush", "0"]
    for table in ("tags", "params", "metrics", "latest_metrics", "runs"):
        pg.query(db, f"DELETE FROM {table} WHERE run_uuid = %s RETURNING 1", (run_b,))
    good, bad_keys, orphans = 1000, 50, 100
    for i in range(good):
        s.send("metric", "a", "ok", i, i, TS0 + i)
        if i % 20 == 0:
            s.send("metric", "a", "bad//key", i, i, TS0 + i)
        if i % 10 == 0:
            s.send("metric", "b", "orphan", i, i, TS0 + i)
    s.send("flush", 60000)
    assert s.read("flush") == ["flush", "0"]
    s.send("errors")
    counters = s.finish()
    rows, distinct = count(pg, db, run_a)
    lines = (agent.workdir / "journal" / "dead-letter.jsonl").read_text().splitlines()
    import json
    records = [json.loads(l) for l in lines]
    report("poison-rows", good + bad_keys + orphans, rows, rows - distinct,
           dead_lettered=len(records))
    assert rows == distinct == good
    assert sum(1 for r in records if r["code"] == 2) == bad_keys
    gone = [r for r in records if r["code"] == 24]
    assert len(gone) == orphans
    assert all(r["reason"] == f"Run with id={run_b} not found" and r["event"]["run_id"] == run_b
               and r["event"]["key"] == "orphan" for r in gone)
    assert agent.stats()["dead_lettered"] == bad_keys + orphans
    assert int(counters["errors"]) == bad_keys + orphans



def test_journal_full_pushes_back_without_loss(pg, db, tmp_path):
    """d) The journal reaches its quota while the database is down: the agent stops reading,
    the client keeps its frames, and everything lands once the database is back."""
    a = Agent(pg, db, tmp_path / "a")
    a.config.write_text(a.config.read_text().replace(
        "[journal]\n", "[journal]\nquota_bytes = 1048576\nsegment_bytes = 65536\n"))
    a.start()
    s = Streamer(a.socket)
    paused = False
    try:
        s.send("run", "r", "full-exp", "f", "now")
        run_id = s.read("run")[2]
        s.send("flush", 30000)
        assert s.read("flush") == ["flush", "0"]
        pg.pause()
        paused = True
        keys, steps = 40, 10000  # several MiB of frames against a 1 MiB journal
        s.send("gen", "r", keys, steps, TS0)
        wait_for(lambda: a.stats()["journal_full"] > 0, 120, "the journal to fill up")
        pg.resume()
        paused = False
        gen = s.read("gen")
        counters = s.finish()
        rows, distinct = count(pg, db, run_id)
        report("journal-full", keys * steps, rows, rows - distinct,
               dropped=int(counters["dropped"]) + int(counters["lost"]))
        assert "flush=0" in gen, gen
        assert rows == distinct == keys * steps
    finally:
        if paused:
            pg.resume()
        assert a.stop() == 0


def test_through_pgbouncer_transaction_pooling(pg, db, tmp_path):
    """g) All traffic through PgBouncer in transaction pooling mode: no session state may
    cross a transaction, and every point still lands once."""
    import pwd
    import shutil

    import tempfile
    from pathlib import Path

    pgb = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
    d = Path(tempfile.mkdtemp(prefix="trackd-pgb-"))  # pytest's tmp_path is root-only
    os.chmod(d, 0o755)
    (d / "pgbouncer.ini").write_text(
        f"[databases]\n* = host={pg.dir} port=5432\n"
        f"[pgbouncer]\nlisten_addr =\nunix_socket_dir = {d}\nlisten_port = 6432\n"
        "auth_type = trust\npool_mode = transaction\ndefault_pool_size = 2\n"
        f"auth_file = {d}/users.txt\nlogfile = {d}/pgbouncer.log\npidfile = {d}/pgbouncer.pid\n")
    (d / "users.txt").write_text('"postgres" ""\n')
    if os.geteuid() == 0:
        pw = pwd.getpwnam("postgres")
        for p in (d, d / "pgbouncer.ini", d / "users.txt"):
            os.chown(p, pw.pw_uid, pw.pw_gid)
    cmd = ([] if os.geteuid() != 0 else ["runuser", "-u", "postgres", "--"]) + [pgb, str(d / "pgbouncer.ini")]
    bouncer = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: (d / ".s.PGSQL.6432").exists(), 30, "pgbouncer to listen")
        a = Agent(pg, db, tmp_path / "a")
        a.config.write_text(a.config.read_text().replace(
            f'dsn = "{pg.dsn(db)}"', f'dsn = "host={d} port=6432 user=postgres dbname={db}"'))
        a.start()
        try:
            s = Streamer(a.socket)
            s.send("run", "r", "bouncer-exp", "b", "now")
            run_id = s.read("run")[2]
            s.send("param", "r", "lr", "0.1")
            s.send("tag", "r", "via", "pgbouncer")
            keys, steps = 10, 2000
            s.send("gen", "r", keys, steps, TS0)
            gen = s.read("gen")
            counters = s.finish()
            rows, distinct = count(pg, db, run_id)
            report("pgbouncer-transaction-mode", keys * steps, rows, rows - distinct,
                   dropped=int(counters["dropped"]) + int(counters["lost"]))
            assert "flush=0" in gen, gen
            assert rows == distinct == keys * steps
            assert pg.query(db, "SELECT value FROM params WHERE run_uuid = %s", (run_id,)) == [("0.1",)]
            assert a.stats()["batches_committed"] >= 1
        finally:
            assert a.stop() == 0
    finally:
        bouncer.terminate()
        bouncer.wait(30)
        shutil.rmtree(d, ignore_errors=True)


def test_offline_start_then_database_arrives(pg, db, tmp_path):
    """a') The database is down when the agent starts: it starts anyway (offline), journals
    and acknowledges what clients log, and writes it all once PostgreSQL answers."""
    pg.pause()
    try:
        a = Agent(pg, db, tmp_path / "a").start()
    except BaseException:
        pg.resume()
        raise
    s = Streamer(a.socket)
    try:
        assert "starting offline" in a.log()
        s.send("run", "r", "offline-exp", "o", "now")
        run_id = s.read("run")[2]
        keys, steps = 10, 2000
        s.send("gen", "r", keys, steps, TS0)
        wait_for(lambda: a.stats()["events_received"] >= keys * steps, 60,
                 "the points to reach the agent while the database is down")
        assert a.stats()["db_connected"] == 0 and a.stats()["events_committed"] == 0
        pg.resume()
        gen = s.read("gen")
        counters = s.finish()
        rows, distinct = count(pg, db, run_id)
        report("offline-start", keys * steps, rows, rows - distinct,
               dropped=int(counters["dropped"]) + int(counters["lost"]))
        assert "flush=0" in gen, gen
        assert rows == distinct == keys * steps
        st = a.stats()
        assert st["db_connected"] == 1 and st["db_schema_errors"] == 0
    finally:
        pg.resume() if not (pg.dir / ".s.PGSQL.5432").exists() else None
        assert a.stop() == 0


def test_replay_larger_than_memory_bound(pg, db, tmp_path):
    """b') A journal holding far more than [batch] max_pending_bytes (the agent was killed
    during an outage, then restarted with a smaller bound) replays in bounded memory: the
    replay waits for the database instead of loading everything, then all of it lands."""
    # The first agent takes all 200,000 points while the database is down: its bound must
    # hold them (the default's 20 MiB, counted by array capacity, may not).
    a = Agent(pg, db, tmp_path / "a", extra="[batch]\nmax_pending_bytes = 67108864\n").start()
    b = None
    s = Streamer(a.socket)
    resumed = False
    pg.pause()
    try:
        s.send("run", "r", "replay-exp", "r", "now")
        run_id = s.read("run")[2]
        keys, steps = 20, 10000
        s.send("gen", "r", keys, steps, TS0)
        wait_for(lambda: a.stats()["events_received"] >= keys * steps + 1, 120,
                 "every point in the journal")
        held = a.stats()["queue_bytes"]
        a.kill()
        limit = 1 << 20
        assert held > 4 * limit, held
        b = Agent(pg, db, tmp_path / "a", extra="[batch]\nmax_pending_bytes = 1048576\n")
        b.start(wait=False)
        wait_for(lambda: "waiting for PostgreSQL" in b.log(), 60, "the replay to wait")
        assert "[agent] ready" not in b.log().split("trackd 0")[-1]
        pg.resume()
        resumed = True
        wait_for(lambda: b.log().count("[agent] ready") >= 2, 120, "the replay to finish")
        gen = s.read("gen")
        counters = s.finish()
        rows, distinct = count(pg, db, run_id)
        st = b.stats()
        report("replay-bounded", keys * steps, rows, rows - distinct,
               dropped=int(counters["dropped"]) + int(counters["lost"]))
        print(f"journal held {held} pending bytes; replay peak {st['queue_bytes_peak']} "
              f"bytes against max_pending_bytes={limit}")
        assert "flush=0" in gen, gen
        assert rows == distinct == keys * steps
        assert st["replayed_frames"] > 0
        # The bound, plus what one frame (up to 8,192 points) adds before the replay waits:
        # the open batch's arrays grow by doubling, so up to 3 MiB here.
        assert st["queue_bytes_peak"] < limit + (3 << 20), st["queue_bytes_peak"]
        assert st["queue_bytes_peak"] < held // 4, (st["queue_bytes_peak"], held)
    finally:
        if not resumed:
            pg.resume()
        a.kill()
        if b is not None:
            assert b.stop() == 0


def test_primary_failover_to_promoted_standby(pg, db, tmp_path):
    """e) The agent's DSN lists a primary and its streaming standby with
    target_session_attrs=read-write. The primary crashes mid-stream and the standby is
    promoted: to the agent this is one more outage, and every point lands once."""
    from harness import Postgres

    primary = Postgres().start()
    standby = None
    try:
        primary.copy_db(pg, db, "fo")
        standby = Postgres().start_standby(primary)
        # Synchronous replication: a commit the agent saw is on the standby too. Set after
        # the base backup, so the promoted standby does not wait for a standby of its own.
        with primary.connect() as c:
            c.execute("ALTER SYSTEM SET synchronous_standby_names = '*'")
            c.execute("SELECT pg_reload_conf()")
        wait_for(lambda: primary.query("postgres", "SELECT sync_state FROM pg_stat_replication")
                 == [("sync",)], 30, "the standby to replicate synchronously")
        a = Agent(pg, db, tmp_path / "a")
        a.config.write_text(a.config.read_text().replace(
            f'dsn = "{pg.dsn(db)}"',
            f'dsn = "host={primary.dir},{standby.dir} user=postgres dbname=fo '
            f'target_session_attrs=read-write"'))
        a.start()
        try:
            s = Streamer(a.socket)
            s.send("run", "r", "failover-exp", "f", "now")
            run_id = s.read("run")[2]
            keys, steps = 10, 5000
            s.send("gen", "r", keys, steps, TS0)
            wait_for(lambda: count(primary, "fo", run_id)[0] > 0, 60,
                     "the first committed points on the primary")
            primary.crash()
            standby.promote()
            gen = s.read("gen")
            counters = s.finish()
            rows, distinct = count(standby, "fo", run_id)
            report("primary-failover", keys * steps, rows, rows - distinct,
                   dropped=int(counters["dropped"]) + int(counters["lost"]))
            assert "flush=0" in gen, gen
            assert rows == distinct == keys * steps
            assert a.stats()["db_connects"] >= 2
            assert f"on {standby.dir}" in a.log()
        finally:
            assert a.stop() == 0
    finally:
        primary.stop()
        if standby:
            standby.stop()


def test_offline_start_against_a_database_without_schema(pg, tmp_path):
    """An agent that started offline checks the schema when the database appears: a database
    MLflow never initialised is not written to; the error is logged and counted, and the
    events stay in the journal."""
    empty = "t_offline_no_schema"
    pg.create_db(empty)
    pg.pause()
    a = Agent(pg, empty, tmp_path / "a")
    a.config.write_text(a.config.read_text().replace("shutdown_grace_ms = 20000",
                                                     "shutdown_grace_ms = 500"))
    try:
        a.start()
    finally:
        pg.resume()
    try:
        out, _ = run_driver(a.socket, [["run", "r", "e", "x", "now"], ["flush", "1000"]],
                            check=False)
        wait_for(lambda: a.stats()["db_schema_errors"] >= 1, 30, "the schema check to fail")
        assert f"database {empty} has no MLflow schema" in a.log()
        assert a.stats()["events_committed"] == 0 and a.stats()["db_connected"] == 0
        assert ["flush", "0"] not in out
    finally:
        assert a.stop() == 0
    assert "they stay in the journal" in a.log()
