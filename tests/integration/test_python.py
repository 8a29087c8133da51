"""The Python package end to end: the fluent API and trackd._trackd.Client through a real agent
into a real PostgreSQL, checked row by row with SQL. Fork, agent-down and exit behaviour run in
their own interpreter (subprocess) because they are about a whole process."""
import ast
import inspect
import json
import logging
import math
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import trackd
import trackd._trackd as _trackd
from harness import Agent

DBL_MAX = 1.7976931348623157e308
TS0 = 1_700_000_000_000


@pytest.fixture
def fluent():
    """The fluent API owns one client per process: close it after each test so the next
    test's start_run(socket=...) makes a new one for its own agent."""
    trackd.errors()
    yield
    trackd.shutdown(30)
    trackd.errors()


def stored(v):
    """What the agent stores for a value: (value, is_nan)."""
    if math.isnan(v):
        return 0.0, True
    if math.isinf(v):
        return (DBL_MAX if v > 0 else -DBL_MAX), False
    return v, False


class Half:
    """Not a number, but convertible: anything with __float__ is a metric value."""

    def __init__(self, x):
        self.x = x

    def __float__(self):
        return self.x / 2


def loss_at(step):
    return {100: math.nan, 200: math.inf, 300: -math.inf}.get(step, round(1.0 / (step + 1), 9))


def run_script(script, *args, env=None, timeout=60):
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout)


def test_fluent_run_params_tags_and_3000_points(pg, db, agent, fluent):
    with trackd.start_run("py-exp", run_name="fluent", tags={"team": "ml", "epochs": 3},
                          socket=agent.socket) as run:
        assert trackd.active_run() is run
        assert trackd.log_param("lr", 0.01) is True
        trackd.log_params({"batch": 64, "opt": "adam"})
        trackd.set_tag("note", "hello\tworld")
        trackd.set_tags({"k": 1})
        for step in range(1000):
            ts = TS0 + step
            trackd.log_metric("loss", loss_at(step), step=step, timestamp=ts)
            acc = np.float32(step / 1000) if step % 2 else np.float64(step / 1000)
            trackd.log_metrics({"acc": acc}, step=step, timestamp=ts)
            trackd.log_metric("half", Half(step), step, ts)
        assert trackd.flush(30) is True
    assert trackd.active_run() is None

    expected = set()
    for step in range(1000):
        acc = float(np.float32(step / 1000)) if step % 2 else step / 1000
        for key, v in (("loss", loss_at(step)), ("acc", acc), ("half", step / 2)):
            expected.add((key, *stored(v)[:1], TS0 + step, step, stored(v)[1]))
    rows = pg.query(db, "SELECT key, value, timestamp, step, is_nan FROM metrics "
                        "WHERE run_uuid = %s", (run.run_id,))
    assert len(rows) == 3000
    assert set(rows) == expected
    special = pg.query(db, "SELECT step, value, is_nan FROM metrics WHERE run_uuid = %s "
                           "AND key = 'loss' AND step IN (100, 200, 300) ORDER BY step",
                       (run.run_id,))
    assert special == [(100, 0.0, True), (200, DBL_MAX, False), (300, -DBL_MAX, False)]
    latest = pg.query(db, "SELECT key, value, step, timestamp, is_nan FROM latest_metrics "
                          "WHERE run_uuid = %s ORDER BY key", (run.run_id,))
    assert latest == [("acc", float(np.float32(0.999)), 999, TS0 + 999, False),
                      ("half", 499.5, 999, TS0 + 999, False),
                      ("loss", 0.001, 999, TS0 + 999, False)]

    exp_id = pg.query(db, "SELECT experiment_id FROM experiments WHERE name = 'py-exp'")[0][0]
    assert pg.query(db, "SELECT name, status, experiment_id, lifecycle_stage, end_time IS NOT NULL "
                        "FROM runs WHERE run_uuid = %s", (run.run_id,)) == [
        ("fluent", "FINISHED", exp_id, "active", True)]
    assert dict(pg.query(db, "SELECT key, value FROM params WHERE run_uuid = %s",
                         (run.run_id,))) == {"lr": "0.01", "batch": "64", "opt": "adam"}
    assert dict(pg.query(db, "SELECT key, value FROM tags WHERE run_uuid = %s",
                         (run.run_id,))) == {
        "team": "ml", "epochs": "3", "note": "hello\tworld", "k": "1",
        "mlflow.runName": "fluent", "mlflow.user": "root", "mlflow.source.name": sys.argv[0],
        "mlflow.source.type": "LOCAL"}
    st = trackd.stats()
    assert st["dropped"] == 0 and st["errors"] == 0 and st["connected"] == 1
    assert st["queued"] == st["sent"] == 1 + 1 + 2 + 1 + 1 + 3000 + 1  # run, 5 kv, points, end
    assert trackd.errors() == []


def test_context_manager_marks_failed_and_reraises(pg, db, agent, fluent):
    with pytest.raises(ZeroDivisionError):
        with trackd.start_run("fail-exp", socket=agent.socket) as run:
            trackd.log_metric("m", 1.0, timestamp=TS0)
            1 / 0
    assert trackd.active_run() is None
    assert trackd.flush(30) is True
    assert pg.query(db, "SELECT status, end_time IS NOT NULL FROM runs WHERE run_uuid = %s",
                    (run.run_id,)) == [("FAILED", True)]
    assert pg.query(db, "SELECT key, value, step FROM metrics WHERE run_uuid = %s",
                    (run.run_id,)) == [("m", 1.0, 0)]
    # A random MLflow-style name when none is given.
    name = pg.query(db, "SELECT name FROM runs WHERE run_uuid = %s", (run.run_id,))[0][0]
    assert run.run_name is None and len(name.split("-")) == 3


def test_calls_without_an_active_run_raise(agent, fluent):
    for call in (lambda: trackd.log_metric("m", 1.0), lambda: trackd.log_metrics({"m": 1.0}),
                 lambda: trackd.log_param("p", 1), lambda: trackd.log_params({"p": 1}),
                 lambda: trackd.set_tag("t", 1), lambda: trackd.set_tags({"t": 1})):
        with pytest.raises(RuntimeError, match=r"no active run; call trackd.start_run\(\) first"):
            call()
    trackd.end_run()  # like MLflow: a no-op without an active run


def test_nested_runs(pg, db, agent, fluent):
    with trackd.start_run("nest-exp", run_name="parent", socket=agent.socket) as parent:
        with pytest.raises(trackd.ActiveRunError) as ei:
            trackd.start_run("nest-exp", run_name="second")
        assert str(ei.value) == (
            f"Run with UUID {parent.run_id} is already active. To start a new run, first end the "
            "current run with trackd.end_run(). To start a nested run, call start_run with "
            "nested=True")
        with trackd.start_run("nest-exp", run_name="child", nested=True) as child:
            assert trackd.active_run() is child and child.parent_run_id == parent.run_id
            trackd.log_metric("m", 2.0, timestamp=TS0)
        assert trackd.active_run() is parent
        trackd.log_metric("m", 1.0, timestamp=TS0)
    assert trackd.active_run() is None

    assert pg.query(db, "SELECT run_uuid, value FROM tags WHERE key = 'mlflow.parentRunId'") == [
        (child.run_id, parent.run_id)]
    runs = pg.query(db, "SELECT r.name, r.status, m.value FROM runs r JOIN metrics m USING "
                        "(run_uuid) JOIN experiments e USING (experiment_id) "
                        "WHERE e.name = 'nest-exp' ORDER BY r.name")
    assert runs == [("child", "FINISHED", 2.0), ("parent", "FINISHED", 1.0)]


def test_changed_param_raises_from_flush_and_is_logged(pg, db, agent, fluent, caplog):
    caplog.set_level(logging.WARNING, logger="trackd")
    with trackd.start_run("param-exp", socket=agent.socket) as run:
        trackd.log_param("alpha", 1)
        trackd.log_param("alpha", 2)
        trackd.log_param("beta", "b")
        trackd.log_metric("m", 1.5, timestamp=TS0)
        with pytest.raises(trackd.TrackdError) as ei:
            trackd.flush(30)
        assert trackd.flush(30) is True  # nothing new: no second raise
    message = (f"Changing param values is not allowed. Param with key='alpha' was already logged "
               f"with value='1' for run ID='{run.run_id}'. Attempted logging new value '2'.")
    assert [(code, msg) for _, code, msg in ei.value.errors] == [(20, message)]
    assert message in str(ei.value)
    logged = [r.getMessage() for r in caplog.records if r.name == "trackd"]
    assert len(logged) == 1 and logged[0].endswith(f"(seq {ei.value.errors[0][0]}, code 20): "
                                                   f"{message}")
    assert trackd.errors() == ei.value.errors  # still readable once
    assert trackd.errors() == []
    assert dict(pg.query(db, "SELECT key, value FROM params WHERE run_uuid = %s",
                         (run.run_id,))) == {"alpha": "1", "beta": "b"}
    assert pg.query(db, "SELECT key, value FROM metrics WHERE run_uuid = %s",
                    (run.run_id,)) == [("m", 1.5)]
    assert pg.query(db, "SELECT status FROM runs WHERE run_uuid = %s", (run.run_id,)) == [
        ("FINISHED",)]


def test_end_run_raises_new_errors(pg, db, agent, fluent, caplog):
    caplog.set_level(logging.WARNING, logger="trackd")
    trackd.start_run("end-exp", socket=agent.socket)
    trackd.log_metric("bad key!", 1.0)
    with pytest.raises(trackd.TrackdError) as ei:
        trackd.end_run()
    assert trackd.active_run() is None
    assert len(ei.value.errors) == 1 and "bad key!" in ei.value.errors[0][2]
    assert len([r for r in caplog.records if r.name == "trackd"]) == 1


def test_eight_threads_on_one_run(pg, db, agent, fluent):
    with trackd.start_run("thread-exp", socket=agent.socket) as run:
        def work(t):
            for i in range(5000):
                trackd.log_metric(f"t{t}", float(i), step=i, timestamp=TS0)

        threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert trackd.flush(60) is True
    assert pg.query(db, "SELECT count(*) FROM metrics WHERE run_uuid = %s", (run.run_id,)) == [
        (40_000,)]
    assert pg.query(db, "SELECT key, count(*), sum(step) FROM metrics WHERE run_uuid = %s "
                        "GROUP BY key ORDER BY key", (run.run_id,)) == [
        (f"t{t}", 5000, sum(range(5000))) for t in range(8)]
    assert trackd.stats()["dropped"] == 0


FORK_SCRIPT = r"""
import json, os, sys
import trackd

sock, ts0 = sys.argv[1], int(sys.argv[2])
with trackd.start_run("fork-exp", run_name="parent", socket=sock) as run:
    for i in range(500):
        trackd.log_metric("m", i, step=i, timestamp=ts0)
    assert trackd.flush(30)
    pid = os.fork()
    if pid == 0:
        code = 3
        try:
            out = {"child_pid": os.getpid(), "active": trackd.active_run() is not None}
            try:
                run._client.log_metric(run.run_id, "m", 1.0)
                out["stale"] = "no error"
            except RuntimeError as e:
                out["stale"] = str(e)
            with trackd.start_run("fork-exp", run_name="child", socket=sock) as child:
                for i in range(700):
                    trackd.log_metric("m", i, step=i, timestamp=ts0)
            out["child"] = child.run_id
            out["flushed"] = trackd.flush(30)
            print(json.dumps(out), flush=True)
            code = 0
        finally:
            os._exit(code)
    for i in range(500, 1000):
        trackd.log_metric("m", i, step=i, timestamp=ts0)
    _, status = os.waitpid(pid, 0)
    ok = trackd.flush(30)
print(json.dumps({"parent": run.run_id, "parent_pid": os.getpid(), "child_status": status,
                  "flushed": ok}), flush=True)
"""


def test_fork_child_gets_its_own_client(pg, db, agent):
    p = run_script(FORK_SCRIPT, agent.socket, str(TS0))
    assert p.returncode == 0, p.stderr
    lines = [json.loads(line) for line in p.stdout.splitlines()]
    child = next(o for o in lines if "child" in o)
    parent = next(o for o in lines if "parent" in o)
    assert parent["child_status"] == 0 and parent["flushed"] is True
    assert child["flushed"] is True and child["active"] is False
    assert child["stale"].startswith("trackd client belongs to the parent process")
    assert pg.query(db, "SELECT count(*), count(DISTINCT step) FROM metrics WHERE run_uuid = %s",
                    (parent["parent"],)) == [(1000, 1000)]
    assert pg.query(db, "SELECT count(*), count(DISTINCT step) FROM metrics WHERE run_uuid = %s",
                    (child["child"],)) == [(700, 700)]
    assert dict(pg.query(db, "SELECT name, status FROM runs")) == {
        "parent": "FINISHED", "child": "FINISHED"}
    # One connection each: the child never wrote on the parent's connection.
    hellos = [int(pid) for pid in re.findall(r"hello from pid (\d+)", agent.log())]
    assert sorted(hellos) == sorted([parent["parent_pid"], child["child_pid"]])
    assert agent.stats()["metrics_committed"] == 1700


AGENT_DOWN_SCRIPT = r"""
import json, time
import trackd

trackd.configure(buffer_bytes=64 * 1024)
run = trackd.start_run("down-exp")
t0 = time.monotonic()
results = [trackd.log_metric("m", float(i), step=i) for i in range(100_000)]
loop_s = time.monotonic() - t0
stats = trackd.stats()
t1 = time.monotonic()
flushed = trackd.flush(timeout=1)
flush_s = time.monotonic() - t1
print(json.dumps({"loop_s": loop_s, "flush_s": flush_s, "flushed": flushed, "stats": stats,
                  "refused": results.count(False)}), flush=True)
"""


def test_agent_down_never_blocks(tmp_path):
    sock = str(tmp_path / "nobody-listens.sock")
    t0 = time.monotonic()
    p = run_script(AGENT_DOWN_SCRIPT,
                   env={"TRACKD_SOCKET": sock, "TRACKD_EXIT_TIMEOUT": "2"}, timeout=60)
    elapsed = time.monotonic() - t0
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    st = out["stats"]
    assert out["loop_s"] < 2.0, out  # 100,000 calls: drops cost no waiting
    assert st["sent"] == 0 and st["connected"] == 0
    assert st["queued"] + st["dropped"] == 100_001  # the run start and every point
    assert st["dropped"] == out["refused"] > 90_000
    assert out["flushed"] is False and 0.9 <= out["flush_s"] < 5.0
    assert f"trackd dropped {st['dropped']} event(s)" in p.stderr
    # At exit the final flush gives up after TRACKD_EXIT_TIMEOUT=2 seconds.
    assert "not everything logged was confirmed by the agent within 2.0 s" in p.stderr
    assert elapsed < 10.0


def test_agent_restarted_mid_run(pg, db, tmp_path, fluent):
    a = Agent(pg, db, tmp_path / "a").start()
    b = None
    try:
        with trackd.start_run("restart-exp", socket=a.socket) as run:
            for s in range(100):
                trackd.log_metric("m", float(s), step=s, timestamp=TS0 + s)
            assert trackd.flush(30) is True
            assert a.stop() == 0

            b = Agent(pg, db, tmp_path / "b")
            b.socket = a.socket
            b.config.write_text(b.config.read_text().replace(str(tmp_path / "b" / "trackd.sock"),
                                                             a.socket))
            b.start()
            for s in range(100, 200):
                trackd.log_metric("m", float(s), step=s, timestamp=TS0 + s)
            assert trackd.flush(30) is True
        assert pg.query(db, "SELECT count(*), min(step), max(step) FROM metrics "
                            "WHERE run_uuid = %s", (run.run_id,)) == [(200, 0, 199)]
        assert pg.query(db, "SELECT status FROM runs WHERE run_uuid = %s", (run.run_id,)) == [
            ("FINISHED",)]
        st = trackd.stats()
        assert st["dropped"] == 0 and st["reconnects"] == 1
    finally:
        trackd.shutdown(5)  # while an agent still answers
        a.kill()
        if b is not None:
            assert b.stop() == 0


def test_flush_without_timeout_is_interruptible(tmp_path):
    """flush(None) waits with the GIL released, in slices that let Ctrl-C through."""
    script = ("import signal, sys, trackd._trackd as t\n"
              "c = t.Client(socket=sys.argv[1])\n"
              "signal.signal(signal.SIGALRM, signal.default_int_handler)\n"
              "signal.setitimer(signal.ITIMER_REAL, 0.5)\n"
              "try:\n    c.flush()\nexcept KeyboardInterrupt:\n    print('interrupted')\n"
              "c.close(0)\n")
    p = run_script(script, str(tmp_path / "none.sock"), timeout=30)
    assert p.returncode == 0 and p.stdout == "interrupted\n", p.stderr


def test_client_api(pg, db, agent, artifact_root):
    """trackd._trackd.Client directly: what the MLflow store plugin builds on."""
    with _trackd.Client(socket=agent.socket, source_name="client.py") as c:
        run_id = _trackd.new_run_id()
        assert re.fullmatch(r"[0-9a-f]{32}", run_id)
        location = f"file://{artifact_root}/client-art"
        assert c.create_experiment("client-exp", artifact_location=location) is True
        assert c.start_run(run_id, "client-exp", run_name="before", start_time=TS0,
                           tags={"a": "1", "b": "2"}) is True
        assert c.log_batch(run_id, metrics=[("m", 1.0, TS0, 0), ("m", np.int64(2), TS0 + 1, 1)],
                           params=[("p", "v")], tags={"c": "3"}) is True
        assert c.log_metric(run_id, key="n", value=7, step=3, timestamp=TS0) is True
        assert c.delete_tag(run_id, "a") is True
        assert c.update_run(run_id, run_name="after") is True
        assert c.update_run(run_id, status="KILLED", end_time=TS0 + 5) is True
        assert c.flush(30) is True
        assert c.errors() == []
        st = c.stats()
        assert set(st) == {"queued", "sent", "dropped", "lost", "errors", "errors_lost", "reconnects",
                           "buffered_bytes", "connected"}
        assert st["dropped"] == 0 and st["queued"] == st["sent"]
        assert c.backend_uri(timeout=5) is None  # this agent announces none

        with pytest.raises(ValueError, match="run_id must be 32 lower-case hex characters"):
            c.log_metric("not-a-run", "m", 1.0)
        with pytest.raises(TypeError):
            c.log_metric(run_id, "m", "1.0")
        with pytest.raises(TypeError):
            c.log_param(run_id, "p", 1)  # the fluent layer stringifies, the binding does not
        with pytest.raises(ValueError, match="NUL"):
            c.set_tag(run_id, "x\0y", "v")

    assert c.closed
    with pytest.raises(RuntimeError, match="closed"):
        c.log_metric(run_id, "m", 1.0)
    exp_id, stored_location = pg.query(db, "SELECT experiment_id, artifact_location FROM "
                                           "experiments WHERE name = 'client-exp'")[0]
    assert stored_location == location
    assert pg.query(db, "SELECT name, status, start_time, end_time FROM runs WHERE run_uuid = %s",
                    (run_id,)) == [("after", "KILLED", TS0, TS0 + 5)]
    assert dict(pg.query(db, "SELECT key, value FROM tags WHERE run_uuid = %s", (run_id,))) == {
        "b": "2", "c": "3", "mlflow.runName": "after", "mlflow.user": "root",
        "mlflow.source.name": "client.py", "mlflow.source.type": "LOCAL"}
    assert sorted(pg.query(db, "SELECT key, value, step FROM metrics WHERE run_uuid = %s",
                           (run_id,))) == [("m", 1.0, 0), ("m", 2.0, 1), ("n", 7.0, 3)]
    assert pg.query(db, "SELECT key, value FROM params WHERE run_uuid = %s", (run_id,)) == [
        ("p", "v")]


def test_overflow_block_policy_waits_then_drops(tmp_path):
    """With no agent, 'block' waits block_timeout_ms for space, then drops (returns False)."""
    c = _trackd.Client(socket=str(tmp_path / "none.sock"), buffer_bytes=4096, overflow="block",
                       block_timeout_ms=50)
    run_id = _trackd.new_run_id()
    results = []
    while len(results) < 1000 and (not results or results[-1]):
        results.append(c.log_metric(run_id, "m", float(len(results))))
    assert results[0] is True and results[-1] is False
    t0 = time.monotonic()
    assert c.log_metric(run_id, "m", 1.0) is False
    assert time.monotonic() - t0 >= 0.04
    st = c.stats()
    assert st["dropped"] == 2 and st["queued"] == len(results) - 1
    c.close(0)
    with pytest.raises(ValueError, match="overflow must be 'drop' or 'block'"):
        _trackd.Client(overflow="wait")


def test_type_stubs_match_the_extension():
    """_trackd.pyi names every function and parameter of the extension (whose docstrings carry
    text signatures, so inspect sees them), and every public name of trackd has a docstring."""
    stub = ast.parse((Path(_trackd.__file__).parent / "_trackd.pyi").read_text())
    functions = {n.name: n for n in stub.body if isinstance(n, ast.FunctionDef)}
    client = next(n for n in stub.body if isinstance(n, ast.ClassDef) and n.name == "Client")
    methods = {n.name: n for n in client.body if isinstance(n, ast.FunctionDef)}

    def params(node, skip_self):
        args = node.args.args[1:] if skip_self else node.args.args
        return [a.arg for a in args]

    assert set(functions) == {n for n in dir(_trackd) if not n.startswith("_")
                              and callable(getattr(_trackd, n)) and n != "Client"}
    for name, node in functions.items():
        assert params(node, False) == list(inspect.signature(getattr(_trackd, name)).parameters)
    public = {n for n in dir(_trackd.Client) if not n.startswith("_")}
    assert set(methods) - {"__init__", "__enter__", "__exit__"} == public
    for name in public - {"closed"}:
        real = list(inspect.signature(getattr(_trackd.Client, name)).parameters)[1:]
        assert params(methods[name], True) == real, name
    assert params(methods["__init__"], True) == list(inspect.signature(_trackd.Client).parameters)
    for name in trackd.__all__:
        assert getattr(trackd, name).__doc__, f"trackd.{name} has no docstring"
