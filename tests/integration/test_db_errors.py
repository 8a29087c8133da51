"""Transient database errors with a real server: only class 22 and 23 may reject an event;
timeouts, locks, terminated backends and refused connections are retried until every
acknowledged point is committed, and each is counted by SQLSTATE class."""

import psycopg
import pytest

from harness import Agent, Streamer, count, report, wait_for

TS0 = 1_700_000_000_000
POINTS = 300


def dead_letters(agent):
    path = agent.workdir / "journal" / "dead-letter.jsonl"
    return path.read_text().splitlines() if path.exists() else []


class TableLock:
    """Another session holding ACCESS EXCLUSIVE on one of MLflow's tables until release()."""

    def __init__(self, pg, db, table):
        self.conn = psycopg.connect(pg.dsn(db))
        self.conn.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")

    def release(self):
        if not self.conn.closed:
            self.conn.commit()
            self.conn.close()


def start_run(a, name):
    s = Streamer(a.socket)
    return s, s.start_run("errors-exp", name)


def log_points(s):
    for i in range(POINTS):
        s.send("metric", "r", "loss", i * 0.5, i, TS0 + i)
    s.send("flush", 120000)


def finish(scenario, pg, db, a, s, run_id):
    """The flush returns, every point is in metrics once, nothing is dead-lettered."""
    assert s.read("flush") == ["flush", "0"]
    counters = s.finish()
    rows, distinct = count(pg, db, run_id)
    dead = dead_letters(a)
    report(scenario, POINTS, rows, rows - distinct, dead_lettered=len(dead),
           dropped=int(counters["dropped"]) + int(counters["lost"]))
    assert rows == distinct == POINTS
    assert dead == []
    assert counters["errors"] == "0", counters
    st = a.stats()
    assert st["rejected_database"] == 0 and st["batch_splits"] == 0, st
    latest = pg.query(db, "SELECT step, value FROM latest_metrics WHERE run_uuid = %s",
                      (run_id,))
    assert latest == [(POINTS - 1, (POINTS - 1) * 0.5)]
    return st


@pytest.mark.parametrize("setting, sqlstate, class_name, advice", [
    ("statement_timeout = '2s'", "57014", "operator intervention",
     "raise statement_timeout for trackd's role"),
    ("lock_timeout = '300ms'", "55P03", "object not in prerequisite state",
     "find it in pg_locks and pg_stat_activity"),
], ids=["statement-timeout-under-lock", "lock-timeout"])
def test_timeout_under_a_lock_is_retried(pg, db, tmp_path, setting, sqlstate, class_name,
                                         advice):
    """A timeout set on the database while another session locks latest_metrics for longer:
    every transaction fails with the timeout's SQLSTATE until the lock goes, nothing is
    rejected, and then all points commit."""
    with pg.connect() as c:
        c.execute(f'ALTER DATABASE "{db}" SET {setting}')
    a = Agent(pg, db, tmp_path / "a").start()
    counter = f"db_errors_class_{sqlstate[:2]}"
    lock = None
    try:
        s, run_id = start_run(a, sqlstate)
        lock = TableLock(pg, db, "latest_metrics")
        log_points(s)
        wait_for(lambda: a.stats()[counter] >= 3, 120, f"three failures with {sqlstate}")
        lock.release()
        scenario = "statement-timeout-under-lock" if sqlstate == "57014" else "lock-timeout"
        st = finish(scenario, pg, db, a, s, run_id)
        assert st[counter] >= 3
        assert f"SQLSTATE {sqlstate} (class {sqlstate[:2]}, {class_name})" in a.log()
        assert advice in a.log()
    finally:
        if lock:
            lock.release()
        assert a.stop() == 0


def test_terminated_backend_is_retried(pg, db, tmp_path):
    """The agent's backend is terminated (pg_terminate_backend) while its transaction waits
    for a lock: 57P01 and the lost connection are retried on a new connection."""
    a = Agent(pg, db, tmp_path / "a").start()
    lock = None
    try:
        s, run_id = start_run(a, "terminate")
        lock = TableLock(pg, db, "latest_metrics")
        log_points(s)

        def waiting_backends():
            return pg.query(db, "SELECT pid FROM pg_stat_activity WHERE datname = %s"
                                " AND wait_event_type = 'Lock'", (db,))

        wait_for(waiting_backends, 60, "the agent's transaction to wait for the lock")
        for (pid,) in waiting_backends():
            pg.query(db, "SELECT pg_terminate_backend(%s)", (pid,))
        wait_for(lambda: a.stats()["db_errors_class_57"] >= 1, 60, "the terminated backend")
        # A new connection waits on the same lock again, until the lock is released.
        wait_for(waiting_backends, 60, "the retried transaction to wait for the lock")
        lock.release()
        st = finish("terminated-backend", pg, db, a, s, run_id)
        assert st["db_errors_class_57"] >= 1 and st["db_connects"] >= 2, st
        assert "SQLSTATE 57P01" in a.log()
    finally:
        if lock:
            lock.release()
        assert a.stop() == 0


def make_role(pg, db, role, create):
    """A login role that is not a superuser and may write MLflow's tables; create: and make
    trackd's own in the schema."""
    with pg.connect(db) as c:
        c.execute(f"DO $$ BEGIN CREATE ROLE {role} LOGIN; "
                  "EXCEPTION WHEN duplicate_object THEN NULL; END $$")
        c.execute(f"ALTER ROLE {role} CONNECTION LIMIT -1")
        c.execute(f"{'GRANT' if create else 'REVOKE'} CREATE ON SCHEMA public "
                  f"{'TO' if create else 'FROM'} {role}")
        c.execute(f"GRANT USAGE ON SCHEMA public TO {role}")
        c.execute(f"GRANT ALL ON ALL TABLES IN SCHEMA public TO {role}")
        c.execute(f"GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO {role}")
    return role


@pytest.fixture
def limited_role(pg, db):
    """A role that is not a superuser (superusers ignore connection limits) and may write
    MLflow's tables and create trackd's own."""
    role = make_role(pg, db, "trackd_limited", create=True)
    yield role
    with pg.connect() as c:
        c.execute(f"ALTER ROLE {role} CONNECTION LIMIT -1")


def test_too_many_connections_is_retried(pg, db, tmp_path, limited_role):
    """The agent's role reaches its connection limit (53300 at connect): the agent keeps
    journaling, retries with backoff, and commits everything once a connection is allowed."""
    a = Agent(pg, db, tmp_path / "a")
    a.config.write_text(a.config.read_text().replace("user=postgres", f"user={limited_role}"))
    a.start()
    try:
        s, run_id = start_run(a, "limit")
        with pg.connect() as c:
            c.execute(f"ALTER ROLE {limited_role} CONNECTION LIMIT 0")
            c.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                      " WHERE usename = %s", (limited_role,))
        log_points(s)
        wait_for(lambda: "too many connections for role" in a.log(), 60,
                 "the refused connection in the agent's log")
        # The terminated backend counts as class 08 or 57, as its message did or did not
        # arrive before the socket closed; refused connections count as class 08.
        wait_for(lambda: a.stats()["db_errors_class_08"] >= 2, 60,
                 "connections refused with backoff")
        before = a.stats()
        assert before["db_connected"] == 0 and before["metrics_committed"] == 0, before
        with pg.connect() as c:
            c.execute(f"ALTER ROLE {limited_role} CONNECTION LIMIT -1")
        st = finish("too-many-connections", pg, db, a, s, run_id)
        assert st["db_errors_class_08"] >= 2, st
    finally:
        assert a.stop() == 0


def test_a_role_without_create_writes_without_trackds_tables(pg, db, tmp_path):
    """A DBA grants the agent's role MLflow's tables and nothing more (PostgreSQL 15 no longer
    lets every role create in public): each of trackd's own tables it cannot make is named once
    with what doing without it costs, and runs, params and metrics are written all the same."""
    role = make_role(pg, db, "trackd_dml_only", create=False)
    a = Agent(pg, db, tmp_path / "a")
    a.config.write_text(a.config.read_text().replace("user=postgres", f"user={role}"))
    a.start()
    try:
        s, run_id = start_run(a, "dml-only")
        log_points(s)
        assert s.read("flush") == ["flush", "0"]
        s.finish()
        log = a.log()
    finally:
        assert a.stop() == 0
    rows, distinct = count(pg, db, run_id)
    print(f"\nscenario=role-without-create points={POINTS} committed={rows}")
    assert rows == distinct == POINTS
    assert log.count("cannot create trackd's table trackd_artifacts") == 1, log[-3000:]
    assert log.count("cannot create trackd's table trackd_run_owners") == 1
    assert "every run follows the user_id rule" in log
    assert "cannot use trackd's table trackd_journal_progress" in log
    assert pg.query(db, "SELECT to_regclass('trackd_run_owners'), to_regclass('trackd_artifacts')"
                    ) == [(None, None)]
