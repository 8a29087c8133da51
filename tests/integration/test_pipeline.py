"""End to end through the real shim, agent and PostgreSQL: rows, winners,
rejections, and that one bad event never costs the others."""
import math
import random
import subprocess
import uuid

import pytest
from harness import BUILD, Agent, driver_errors, driver_runs, run_driver

DBL_MAX = 1.7976931348623157e308
TS0 = 1_700_000_000_000


def sanitize(v):
    if math.isnan(v):
        return 0.0, True
    if math.isinf(v):
        return (DBL_MAX if v > 0 else -DBL_MAX), False
    return v, False


def value_for(key_index, step):
    if step == 100:
        return math.nan
    if step == 200:
        return math.inf
    if step == 300:
        return -math.inf
    return round(math.sin(step / 50.0 + key_index) * 10.0, 6)


def expected_latest(points):
    """MLflow's rule, applied in arrival order: strictly greater (step, ts, value) wins."""
    latest = {}
    for key, value, step, ts in points:
        v, is_nan = sanitize(value)
        cur = latest.get(key)
        if cur is None or (step, ts, v) > (cur[1], cur[2], cur[0]):
            latest[key] = (v, step, ts, is_nan)
    return latest


def test_run_params_tags_and_30000_points(pg, db, agent):
    rng = random.Random(7)
    keys = ["train/loss", "train/acc", "lr"]
    points = []
    for ki, key in enumerate(keys):
        steps = list(range(10_000))
        # Out of order: shuffle within windows of 64 steps.
        for i in range(0, len(steps), 64):
            window = steps[i:i + 64]
            rng.shuffle(window)
            steps[i:i + 64] = window
        points += [(key, value_for(ki, s), s, TS0 + s) for s in steps]
    duplicates = rng.sample(points, 500)
    sent = points + duplicates
    lines = [["run", "r", "pipeline-exp", "first-run", str(TS0), "team", "ml", "phase", "test"],
             ["param", "r", "learning_rate", "0.01"], ["param", "r", "batch_size", "64"],
             ["tag", "r", "note", "hello\tworld"]]
    lines += [["metric", "r", k, repr(v), str(s), str(t)] for k, v, s, t in sent]
    lines += [["end", "r", "FINISHED", str(TS0 + 99_999)], ["flush", "60000"], ["errors"],
              ["counters"]]
    out, _ = run_driver(agent.socket, lines, source_name="train.py")
    run_id = driver_runs(out)["r"]
    assert ["flush", "0"] in out
    assert driver_errors(out) == []

    rows = pg.query(db, "SELECT key, value, timestamp, step, is_nan FROM metrics WHERE run_uuid = %s",
                    (run_id,))
    expected = {(k, *sanitize(v)[:1], t, s, sanitize(v)[1]) for k, v, s, t in points}
    assert len(rows) == 30_000
    assert set(rows) == expected
    nan_rows = pg.query(db, "SELECT key, value, is_nan FROM metrics WHERE run_uuid = %s AND step = 100",
                        (run_id,))
    assert sorted(nan_rows) == sorted((k, 0.0, True) for k in keys)
    inf_rows = pg.query(db, "SELECT DISTINCT value FROM metrics WHERE run_uuid = %s AND step IN (200, 300)",
                        (run_id,))
    assert sorted(r[0] for r in inf_rows) == [-DBL_MAX, DBL_MAX]

    latest = {r[0]: r[1:] for r in pg.query(
        db, "SELECT key, value, step, timestamp, is_nan FROM latest_metrics WHERE run_uuid = %s",
        (run_id,))}
    assert latest == expected_latest(sent)

    run = pg.query(db, "SELECT name, status, start_time, end_time, user_id, source_type, lifecycle_stage,"
                       " artifact_uri, experiment_id FROM runs WHERE run_uuid = %s", (run_id,))[0]
    exp_id, artifact_location = pg.query(
        db, "SELECT experiment_id, artifact_location FROM experiments WHERE name = 'pipeline-exp'")[0]
    assert run == ("first-run", "FINISHED", TS0, TS0 + 99_999, "root", "UNKNOWN", "active",
                   f"{artifact_location}/{run_id}/artifacts", exp_id)
    assert artifact_location.endswith(f"/{exp_id}")
    assert dict(pg.query(db, "SELECT key, value FROM params WHERE run_uuid = %s", (run_id,))) == {
        "learning_rate": "0.01", "batch_size": "64"}
    assert dict(pg.query(db, "SELECT key, value FROM tags WHERE run_uuid = %s", (run_id,))) == {
        "team": "ml", "phase": "test", "note": "hello\tworld", "mlflow.runName": "first-run",
        "mlflow.user": "root", "mlflow.source.name": "train.py", "mlflow.source.type": "LOCAL"}
    counters = next(f for f in out if f[0] == "counters")
    assert "sent=%d" % (len(sent) + 5) in counters  # run, 2 params, 1 tag, end
    assert "dropped=0" in counters

    stats = agent.stats()
    assert stats["metrics_committed"] == len(sent)
    assert stats["params_committed"] == 2
    assert stats["batches_committed"] >= 1


def test_latest_metrics_rule_across_batches(pg, db, agent):
    """Ties keep the stored row; a lower step never replaces; NaN compares as 0."""
    phase1 = [("tie", 1.0, 5, 10), ("tie", 3.0, 5, 10), ("tie", 100.0, 5, 9), ("tie", 50.0, 4, 50),
              ("late", 7.0, 10, 1), ("nan", math.nan, 3, 1), ("nan", -1.0, 3, 1)]
    phase2 = [("tie", 3.0, 5, 10), ("tie", 2.0, 5, 10), ("late", 99.0, 9, 99), ("nan", 0.5, 3, 1)]
    lines = [["run", "r", "rule-exp", "", "now"]]
    lines += [["metric", "r", k, repr(v), str(s), str(t)] for k, v, s, t in phase1]
    lines += [["flush", "30000"]]
    lines += [["metric", "r", k, repr(v), str(s), str(t)] for k, v, s, t in phase2]
    lines += [["flush", "30000"], ["errors"]]
    out, _ = run_driver(agent.socket, lines)
    run_id = driver_runs(out)["r"]
    assert [f for f in out if f[0] == "flush"] == [["flush", "0"], ["flush", "0"]]
    latest = {r[0]: r[1:] for r in pg.query(
        db, "SELECT key, value, step, timestamp, is_nan FROM latest_metrics WHERE run_uuid = %s",
        (run_id,))}
    assert latest == expected_latest(phase1 + phase2)
    assert latest["tie"] == (3.0, 5, 10, False)
    assert latest["late"] == (7.0, 10, 1, False)
    assert latest["nan"] == (0.5, 3, 1, False)
    # A random run name like MLflow's, stored in the column and the tag.
    name = pg.query(db, "SELECT name FROM runs WHERE run_uuid = %s", (run_id,))[0][0]
    assert len(name.split("-")) == 3
    assert pg.query(db, "SELECT value FROM tags WHERE run_uuid = %s AND key = 'mlflow.runName'",
                    (run_id,)) == [(name,)]


def test_changed_param_is_rejected_and_the_rest_commits(pg, db, agent):
    lines = [["run", "r", "param-exp", "p", "now"],
             ["param", "r", "alpha", "1"],
             ["param", "r", "alpha", "2"],          # same batch, different value
             ["param", "r", "alpha", "1"],          # same value again: a no-op
             ["flush", "30000"],
             ["param", "r", "alpha", "3"],          # later batch, different value
             ["param", "r", "beta", "b"],
             ["metric", "r", "m", "1.5", "0", str(TS0)],
             ["flush", "30000"], ["errors"]]
    out, _ = run_driver(agent.socket, lines)
    run_id = driver_runs(out)["r"]
    errors = driver_errors(out)
    assert [(code, msg) for _, code, msg in errors] == [
        (20, f"Changing param values is not allowed. Param with key='alpha' was already logged "
             f"with value='1' for run ID='{run_id}'. Attempted logging new value '2'."),
        (20, f"Changing param values is not allowed. Param with key='alpha' was already logged "
             f"with value='1' for run ID='{run_id}'. Attempted logging new value '3'."),
    ]
    assert dict(pg.query(db, "SELECT key, value FROM params WHERE run_uuid = %s", (run_id,))) == {
        "alpha": "1", "beta": "b"}
    assert pg.query(db, "SELECT key, value FROM metrics WHERE run_uuid = %s", (run_id,)) == [("m", 1.5)]
    assert agent.stats()["rejected_param_changed"] == 2


def test_invalid_keys_and_ids_are_rejected_and_the_rest_commits(pg, db, agent):
    bad_keys = ["a//b", "../up", "/abs", "bad key!", "x" * 251, ""]
    lines = [["run", "r", "keys-exp", "k", "now"]]
    for i, k in enumerate(bad_keys):
        lines.append(["metric", "r", k, "1", str(i), str(TS0)])
        lines.append(["metric", "r", f"good/{i}", "2", str(i), str(TS0)])
    lines += [["param", "r", "bad key!", "v"], ["tag", "r", "ok.tag", "v"],
              # Refused by the shim itself (-EINVAL); the agent's own check is in test_protocol.
              ["metric", "0123456789ABCDEF0123456789abcdef", "m", "1", "0", str(TS0)],
              ["flush", "30000"], ["errors"]]
    out, rc = run_driver(agent.socket, lines, check=False)
    assert rc == 1 and [f[2:] for f in out if f[0] == "fail"] == [["metric", "invalid argument"]]
    run_id = driver_runs(out)["r"]
    codes = sorted(code for _, code, _ in driver_errors(out))
    assert codes == sorted([2, 2, 2, 2, 3, 2, 2])
    messages = [m for _, _, m in driver_errors(out)]
    assert any('Invalid value "a//b" for parameter \'name\' supplied' in m for m in messages), messages
    good = pg.query(db, "SELECT key FROM metrics WHERE run_uuid = %s ORDER BY key", (run_id,))
    assert [r[0] for r in good] == [f"good/{i}" for i in range(len(bad_keys))]
    assert pg.query(db, "SELECT key FROM tags WHERE run_uuid = %s AND key = 'ok.tag'", (run_id,)) == [
        ("ok.tag",)]
    stats = agent.stats()
    assert stats["rejected_bad_key"] == 6 and stats["rejected_key_too_long"] == 1


def test_database_rejection_is_isolated(pg, db, agent):
    """Points PostgreSQL refuses for a data reason (here a CHECK constraint of this database,
    SQLSTATE 23514) fail their batch; it is split until only they are rejected."""
    with pg.connect(db) as c:
        c.execute("ALTER TABLE metrics ADD CONSTRAINT no_poison CHECK (key <> 'poison')")
    lines = [["run", "r", "iso-exp", "iso", "now"]]
    for s in range(200):
        lines.append(["metric", "r", "m", str(s), str(s), str(TS0)])
        if s % 50 == 25:
            lines.append(["metric", "r", "poison", str(s), str(s), str(TS0)])
    lines += [["flush", "60000"], ["errors"]]
    out, _ = run_driver(agent.socket, lines)
    run_id = driver_runs(out)["r"]
    errors = driver_errors(out)
    assert len(errors) == 4
    assert all(code == 21 and "SQLSTATE 23514" in msg and "no_poison" in msg
               for _, code, msg in errors), errors
    assert pg.query(db, "SELECT count(*) FROM metrics WHERE run_uuid = %s", (run_id,)) == [(200,)]
    stats = agent.stats()
    assert stats["rejected_database"] == 4
    assert stats["batch_splits"] > 0


def test_unknown_run_is_refused_without_splitting(pg, db, agent):
    """Points for a run no one started are refused as MLflow refuses them ("Run with id=… not
    found"), found by the transaction's run check: nothing fails, nothing is split."""
    ghost = "f" * 32
    lines = [["run", "r", "iso-exp", "iso", "now"]]
    for s in range(200):
        lines.append(["metric", "r", "m", str(s), str(s), str(TS0)])
        if s % 50 == 25:
            lines.append(["metric", ghost, "m", str(s), str(s), str(TS0)])
    lines += [["param", ghost, "p", "v"], ["tag", ghost, "t", "v"], ["end", ghost, "FINISHED", "now"],
              ["flush", "60000"], ["errors"]]
    out, _ = run_driver(agent.socket, lines)
    run_id = driver_runs(out)["r"]
    errors = driver_errors(out)
    assert len(errors) == 7, errors
    assert all(code == 24 and msg == f"Run with id={ghost} not found"
               for _, code, msg in errors), errors
    assert pg.query(db, "SELECT count(*) FROM metrics WHERE run_uuid = %s", (run_id,)) == [(200,)]
    assert pg.query(db, "SELECT count(*) FROM metrics WHERE run_uuid = %s", (ghost,)) == [(0,)]
    stats = agent.stats()
    assert stats["rejected_run_state"] == 7
    assert stats["batch_splits"] == 0 and stats["batches_failed"] == 0


def test_direct_copy_and_every_way_it_falls_back(pg, db, agent):
    """A range that starts no run COPYs its points straight into metrics. The same point twice in
    a range is written once; a point already stored, a run deleted underneath and a run no one
    started each make the range take the staging path, with the same rows and the same refusals
    as there, nothing split or failed."""
    ghost = "e" * 32
    before = agent.stats()

    def delta(stats, name):
        return stats[name] - before[name]

    lines = [["run", "r", "direct-exp", "", "now"], ["flush", "30000"]]
    # 1. Direct: 300 points, one of them twice, and a -0.0 beside a 0.0 (equal in the key).
    for s in range(300):
        lines += [["metric", "r", "m", str(s), str(s), str(TS0)]] * (2 if s == 7 else 1)
    lines += [["metric", "r", "z", "0.0", "0", str(TS0)], ["metric", "r", "z", "-0.0", "0", str(TS0)],
              ["flush", "30000"]]
    # 2. A point equal to a stored one, with new ones: 23505, then the staging path.
    lines += [["metric", "r", "m", "5", "5", str(TS0)], ["metric", "r", "m", "1000", "1000", str(TS0)],
              ["flush", "30000"]]
    # 3. A run no one started: refused as MLflow refuses it.
    lines += [["metric", ghost, "m", "1", "1", str(TS0)], ["metric", "r", "m", "1001", "1001", str(TS0)],
              ["flush", "30000"], ["errors"]]
    out, _ = run_driver(agent.socket, lines)
    run_id = driver_runs(out)["r"]
    assert [f for f in out if f[0] == "flush"] == [["flush", "0"]] * 4
    errors = driver_errors(out)
    assert [(code, msg) for _, code, msg in errors] == [(24, f"Run with id={ghost} not found")]
    rows = pg.query(db, "SELECT key, value, step FROM metrics WHERE run_uuid = %s ORDER BY key, step",
                    (run_id,))
    assert rows == [("m", float(s), s) for s in list(range(300)) + [1000, 1001]] + [("z", 0.0, 0)]
    assert pg.query(db, "SELECT key, value, step FROM latest_metrics WHERE run_uuid = %s ORDER BY key",
                    (run_id,)) == [("m", 1001.0, 1001), ("z", 0.0, 0)]
    stats = agent.stats()
    assert delta(stats, "ranges_direct") >= 3, stats  # more if a batch was cut by time
    assert delta(stats, "direct_fallbacks") == 2, stats
    assert delta(stats, "batches_failed") == 0 and delta(stats, "batch_splits") == 0, stats
    assert delta(stats, "rejected_run_state") == 1 and delta(stats, "rejected_database") == 0

    # 4. A run deleted underneath (as `mlflow runs delete` does): its points are refused with
    # MLflow's words, on the staging path.
    with pg.connect(db) as c:
        c.execute("UPDATE runs SET lifecycle_stage = 'deleted', deleted_time = 1"
                  " WHERE run_uuid = %s", (run_id,))
    out, _ = run_driver(agent.socket, [["metric", run_id, "m", "2000", "2000", str(TS0)],
                                       ["flush", "30000"], ["errors"]])
    errors = driver_errors(out)
    assert [(code, msg) for _, code, msg in errors] == [
        (25, f"The run {run_id} must be in the 'active' state. Current state is deleted.")], errors
    assert pg.query(db, "SELECT count(*) FROM metrics WHERE run_uuid = %s AND step = 2000",
                    (run_id,)) == [(0,)]
    stats2 = agent.stats()
    assert stats2["ranges_direct"] - stats["ranges_direct"] == 1
    assert stats2["direct_fallbacks"] - stats["direct_fallbacks"] == 1


def test_runs_spread_over_writer_connections(pg, db, agent, artifact_root):
    """With the default two writer connections, each run's events go through one of them, two
    runs started together one on each whatever their ids: an experiment made just before is
    found by runs on either, every row lands once, a flush waits for both, and each connection
    keeps its own journal progress row."""
    ids = [uuid.uuid4().hex for _ in range(2)]
    loc = f"{artifact_root}/spread"
    before = agent.stats()
    lines = [["experiment", "spread-exp", loc]]
    # Started by name right after the experiment, no flush between: writer 1 must see it too.
    lines += [["runid", f"r{k}", run_id, "spread-exp", f"run-{k}", "now"] for k, run_id in enumerate(ids)]
    for k in range(2):
        lines += [["param", f"r{k}", "lr", f"0.{k + 1}"], ["tag", f"r{k}", "writer", str(k)]]
    for s in range(1500):
        lines += [["metric", f"r{k}", "loss", str(s * 0.5 + k), str(s), str(TS0 + s)] for k in range(2)]
    lines += [["flush", "60000"], ["errors"]]
    out, _ = run_driver(agent.socket, lines)
    assert [f for f in out if f[0] == "flush"] == [["flush", "0"]], out[-5:]
    assert driver_errors(out) == []
    assert pg.query(db, "SELECT count(*), min(artifact_location) FROM experiments"
                        " WHERE name = 'spread-exp'") == [(1, loc)]
    for k, run_id in enumerate(ids):
        assert pg.query(db, "SELECT name, artifact_uri FROM runs WHERE run_uuid = %s",
                        (run_id,)) == [(f"run-{k}", f"{loc}/{run_id}/artifacts")]
        assert pg.query(db, "SELECT count(*), count(DISTINCT step), max(step) FROM metrics"
                            " WHERE run_uuid = %s", (run_id,)) == [(1500, 1500, 1499)]
        assert pg.query(db, "SELECT value, step FROM latest_metrics WHERE run_uuid = %s",
                        (run_id,)) == [(1499 * 0.5 + k, 1499)]
        assert pg.query(db, "SELECT value FROM params WHERE run_uuid = %s", (run_id,)) == [(f"0.{k + 1}",)]
    st = agent.stats()
    assert st["db_connections"] == 2 and st["db_connected"] == 1, st
    # The experiment's copy for writer 1 is neither received nor committed twice.
    received = st["events_received"] - before["events_received"]
    assert st["events_committed"] - before["events_committed"] == received, st
    assert st["runs_committed"] - before["runs_committed"] == 2
    assert st["runs_routed"] - before["runs_routed"] == 2, st
    assert st["runs_on_busiest_writer_peak"] == 1, st
    keys = sorted(k for (k,) in pg.query(db, "SELECT journal_id FROM trackd_journal_progress"))
    assert len(keys) == 2 and keys[0].endswith("/0/2") and keys[1].endswith("/1/2"), keys
    assert keys[0][:-4] == keys[1][:-4] and len(keys[0][:-4]) == 32, keys
    assert "[writer 1] connected to PostgreSQL" in agent.log()


def test_agent_refuses_database_without_mlflow_schema(pg, tmp_path):
    pg.create_db("empty_db")
    a = Agent(pg, "empty_db", tmp_path / "a").start(wait=False)
    rc = a.proc.wait(30)
    assert rc == 1
    assert "has no MLflow schema (table alembic_version is missing)" in a.log()
    assert "mlflow server" in a.log()


def test_agent_takes_an_unknown_revision_whose_tables_fit(pg, db, tmp_path):
    """A revision trackd is not tested with, on tables that have everything trackd writes: the
    agent starts, says so once, and writes."""
    pg.query(db, "UPDATE alembic_version SET version_num = 'ffffffffffff' RETURNING 1")
    a = Agent(pg, db, tmp_path / "a").start()
    try:
        out, _ = run_driver(a.socket, [["run", "r", "rev-exp", "r", "now"],
                                       ["metric", "r", "m", "1", "0", str(TS0)],
                                       ["flush", "30000"]])
        assert ["flush", "0"] in out
    finally:
        assert a.stop() == 0
    log = a.log()
    assert log.count("MLflow schema revision ffffffffffff is not one trackd is tested with") == 1
    assert "its tables have every column and key trackd writes" in log
    assert pg.query(db, "SELECT count(*) FROM metrics") == [(1,)]


@pytest.mark.parametrize("change,message", [
    ("ALTER TABLE metrics ALTER COLUMN step TYPE integer",
     "column metrics.step is integer, trackd writes it as bigint"),
    ("ALTER TABLE params RENAME COLUMN value TO val",
     "column params.value is missing"),
    ("ALTER TABLE params ALTER COLUMN value TYPE varchar(500)",
     "column params.value holds at most 500 characters, trackd writes up to 6000"),
    ("ALTER TABLE latest_metrics DROP CONSTRAINT {latest_metrics}",
     "latest_metrics has no unique key on (key,run_uuid), which trackd relies on for "
     "ON CONFLICT (key, run_uuid)"),
], ids=["type", "column", "length", "key"])
def test_agent_refuses_tables_that_do_not_fit(pg, db, tmp_path, change, message):
    """Whatever the revision, a table without a column, a type or a key trackd's statements
    need is refused at start, naming it."""
    pk = pg.query(db, "SELECT conname FROM pg_constraint WHERE conrelid = 'latest_metrics'::regclass"
                      " AND contype = 'p'")[0][0]
    with pg.connect(db) as c:
        c.execute(change.format(latest_metrics=pk))
    a = Agent(pg, db, tmp_path / "a").start(wait=False)
    assert a.proc.wait(30) == 1
    assert f"MLflow schema revision dc11669786a5 does not fit: {message}" in a.log(), a.log()


def test_check_config(tmp_path):
    ok = subprocess.run([str(BUILD / "trackd"), "--check-config", str(BUILD.parent / "agent.toml.example")],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text('[agent]\nsocket = "/tmp/x.sock"\nsockt = 1\n')
    r = subprocess.run([str(BUILD / "trackd"), "--check-config", str(bad)], capture_output=True, text=True)
    assert r.returncode != 0
    assert f"{bad}:3:" in r.stderr and "sockt" in r.stderr


def test_sigterm_drains_and_exits_zero(pg, db, tmp_path):
    a = Agent(pg, db, tmp_path / "a").start()
    lines = [["run", "r", "term-exp", "t", "now"], ["gen", "r", "5", "2000", str(TS0)]]
    out, _ = run_driver(a.socket, lines)
    run_id = driver_runs(out)["r"]
    assert a.stop() == 0
    assert "drained" in a.log()
    assert pg.query(db, "SELECT count(*) FROM metrics WHERE run_uuid = %s", (run_id,)) == [(10_000,)]


def test_shim_reconnects_after_agent_restart(pg, db, tmp_path):
    """One training process keeps logging across an agent restart; both phases land."""
    a = Agent(pg, db, tmp_path / "a").start()
    p = subprocess.Popen([str(BUILD / "trackd-driver"), "--socket", a.socket], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True, bufsize=1)

    def send(*fields):
        p.stdin.write("\t".join(fields) + "\n")
        p.stdin.flush()

    def read_until(prefix):
        while True:
            line = p.stdout.readline()
            assert line, "driver exited"
            if line.startswith(prefix):
                return line.rstrip("\n").split("\t")

    send("run", "r", "restart-exp", "r", "now")
    run_id = read_until("run")[2]
    for s in range(100):
        send("metric", "r", "m", str(s), str(s), str(TS0 + s))
    send("flush", "30000")
    assert read_until("flush") == ["flush", "0"]
    assert a.stop() == 0

    b = Agent(pg, db, tmp_path / "b")
    b.socket = a.socket
    b.config.write_text(b.config.read_text().replace(str(tmp_path / "b" / "trackd.sock"), a.socket))
    b.start()
    try:
        # The flush is the barrier: it returns once the shim has reconnected and the agent
        # committed everything logged after the restart.
        for s in range(100, 200):
            send("metric", "r", "m", str(s), str(s), str(TS0 + s))
        send("flush", "30000")
        assert read_until("flush") == ["flush", "0"]
        send("counters")
        counters = read_until("counters")
        p.stdin.close()
        assert p.wait(30) == 0
        assert pg.query(db, "SELECT count(*) FROM metrics WHERE run_uuid = %s", (run_id,)) == [(200,)]
        assert "dropped=0" in counters
    finally:
        assert b.stop() == 0


def test_update_run_delete_tag_and_experiment_location(pg, db, tmp_path):
    """MLflow's update_run_info, delete_tag and create_experiment(artifact_location) semantics,
    and the backend URI the agent announces to clients."""
    a = Agent(pg, db, tmp_path / "a", extra='[artifacts]\nallowed_roots = "s3://bucket"\n').start()
    try:
        lines = [["experiment", "located-exp", "s3://bucket/prefix"],
                 ["experiment", "elsewhere-exp", "s3://other-bucket/prefix"],
                 ["run", "r", "located-exp", "before", str(TS0)],
                 ["tag", "r", "keep", "1"], ["tag", "r", "gone", "1"],
                 ["deltag", "r", "gone"],
                 ["tag", "r", "back", "1"], ["deltag", "r", "back"], ["tag", "r", "back", "2"],
                 ["update", "r", "-", "-", "after"],          # rename only
                 ["update", "r", "KILLED", "-", "-"],         # status only
                 ["update", "r", "-", str(TS0 + 5), "-"],     # end time only
                 ["flush", "30000"], ["errors"], ["backend_uri"]]
        out, _ = run_driver(a.socket, lines)
        run_id = driver_runs(out)["r"]
        # Only below the operator's roots (here allowed_roots), never where a client says.
        errors = driver_errors(out)
        assert [(code, "'s3://other-bucket/prefix' is not below an artifact root" in msg)
                for _, code, msg in errors] == [(26, True)], errors
        assert pg.query(db, "SELECT count(*) FROM experiments WHERE name = 'elsewhere-exp'") == [(0,)]
        exp_id, loc = pg.query(db, "SELECT experiment_id, artifact_location FROM experiments"
                                   " WHERE name = 'located-exp'")[0]
        assert loc == "s3://bucket/prefix"
        assert pg.query(db, "SELECT name, status, end_time, artifact_uri FROM runs WHERE run_uuid = %s",
                        (run_id,)) == [("after", "KILLED", TS0 + 5, f"s3://bucket/prefix/{run_id}/artifacts")]
        tags = dict(pg.query(db, "SELECT key, value FROM tags WHERE run_uuid = %s", (run_id,)))
        assert "gone" not in tags and tags["keep"] == "1" and tags["back"] == "2"
        assert tags["mlflow.runName"] == "after"
        assert [f for f in out if f[0] == "backend_uri"] == [["backend_uri", "-2", ""]]  # -ENOENT
    finally:
        assert a.stop() == 0

    uri = "postgresql://reader@db.example/mlflow"
    b = Agent(pg, db, tmp_path / "b", extra=f'[batch]\nmax_age_ms = 50\n')
    b.config.write_text(b.config.read_text().replace("[mlflow]\n", f'[mlflow]\nbackend_uri = "{uri}"\n'))
    b.start()
    try:
        out, _ = run_driver(b.socket, [["backend_uri"]])
        assert out == [["backend_uri", "0", uri]]
    finally:
        assert b.stop() == 0
