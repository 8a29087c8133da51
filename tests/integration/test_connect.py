"""The writer's way to the database when the DSN names several hosts or a host has several
addresses: an address that refuses or never answers costs one attempt, and the writer goes on to
the next address at once instead of starting the whole host list over after a back-off.

The server listens on 127.0.0.1 only, as a stock PostgreSQL does; ::1 refuses. Every case runs
with the agent's default connect timeout unless the DSN sets libpq's own connect_timeout."""
import os
import re
import shutil
import socket
import subprocess
from datetime import datetime

import pytest
from harness import Agent, driver_runs, free_port, run_driver, wait_for

TS0 = 1_700_000_000_000


@pytest.fixture
def silent_port():
    """A TCP port that takes connections into its backlog and never says a word: a server that
    hangs, as far as a client can tell."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(8)
    yield s.getsockname()[1]
    s.close()


def agent_on(pg, db, tmp_path, artifact_root, dsn):
    a = Agent(pg, db, tmp_path / "agent", artifact_root=str(artifact_root))
    text = a.config.read_text()
    a.config.write_text(re.sub(r'dsn = "[^"]*"', f'dsn = "{dsn}"', text))
    return a


def log_one_point(a, pg, db, timeout_ms=30000):
    out, _ = run_driver(a.socket, [["run", "r", "connect-exp", "c", "now"],
                                   ["metric", "r", "loss", "0.25", "3", str(TS0)],
                                   ["flush", str(timeout_ms)]])
    assert ["flush", "0"] in out, out
    run_id = driver_runs(out)["r"]
    assert pg.query(db, "SELECT key, value, step FROM metrics WHERE run_uuid = %s",
                    (run_id,)) == [("loss", 0.25, 3)]


def stamp(line):
    return datetime.fromisoformat(line.split()[0].replace("Z", "+00:00"))


def connect_lines(a):
    """(the first failed attempt's line, the connected line) of the writer's first connection."""
    lines = a.log().splitlines()
    failed = [l for l in lines if "[writer] cannot connect to PostgreSQL at" in l]
    connected = [l for l in lines if "[writer] connected to PostgreSQL" in l]
    assert failed and connected, a.log()[-3000:]
    return failed, connected[0]


def check_went_straight_on(a, failed, expect_failed):
    """The bad addresses were each tried once, in one cycle, and the good one right after them:
    no back-off (db_retries counts failed cycles) and no second round."""
    assert len(failed) == expect_failed, failed
    assert a.stats()["db_retries"] == 0


def test_first_address_of_a_host_list_refuses(tcp_pg, tmp_path, artifact_root):
    """The case a stock /etc/hosts makes of localhost, written out: ::1 first, then 127.0.0.1."""
    db = tcp_pg.mlflow_db("conn_refuses")
    a = agent_on(tcp_pg, db, tmp_path, artifact_root,
                 f"host=::1,127.0.0.1 port={tcp_pg.port} user=postgres dbname={db}").start()
    try:
        log_one_point(a, tcp_pg, db)
        failed, connected = connect_lines(a)
        check_went_straight_on(a, failed, 1)
        assert "at ::1 port" in failed[0], failed
        assert "on 127.0.0.1 port" in connected and "failed before it: ::1 port" in connected
        print(f"\nrefused ::1 -> connected on 127.0.0.1 after "
              f"{(stamp(connected) - stamp(failed[0])).total_seconds() * 1000:.0f} ms")
    finally:
        assert a.stop() == 0


def test_first_host_has_nobody_listening(tcp_pg, tmp_path, artifact_root):
    db = tcp_pg.mlflow_db("conn_no_listener")
    dead = free_port()
    a = agent_on(tcp_pg, db, tmp_path, artifact_root,
                 f"host=127.0.0.1,127.0.0.1 port={dead},{tcp_pg.port} user=postgres "
                 f"dbname={db}").start()
    try:
        log_one_point(a, tcp_pg, db)
        failed, connected = connect_lines(a)
        check_went_straight_on(a, failed, 1)
        assert f"port {dead}: " in failed[0] and "Connection refused" in failed[0], failed
        assert f"port {tcp_pg.port} " in connected, connected
    finally:
        assert a.stop() == 0


def test_first_host_does_not_answer(tcp_pg, tmp_path, artifact_root, silent_port):
    """libpq's connect_timeout bounds each address, as libpq itself does per host."""
    db = tcp_pg.mlflow_db("conn_silent")
    a = agent_on(tcp_pg, db, tmp_path, artifact_root,
                 f"host=127.0.0.1,127.0.0.1 port={silent_port},{tcp_pg.port} connect_timeout=2 "
                 f"user=postgres dbname={db}").start()
    try:
        log_one_point(a, tcp_pg, db)
        failed, connected = connect_lines(a)
        check_went_straight_on(a, failed, 1)
        assert f"port {silent_port}: no answer within 2000 ms" in failed[0], failed
        print(f"\nsilent host -> connected after "
              f"{(stamp(connected) - stamp(failed[0])).total_seconds() * 1000:.0f} ms")
    finally:
        assert a.stop() == 0


def test_every_address_fails_then_the_server_comes(tcp_pg, tmp_path, artifact_root):
    """All addresses refuse: the agent backs off and walks the list again, and writes as soon as
    the server is back."""
    db = tcp_pg.mlflow_db("conn_outage")
    tcp_pg.pause()
    try:
        a = agent_on(tcp_pg, db, tmp_path, artifact_root,
                     f"host=::1,127.0.0.1 port={tcp_pg.port} user=postgres dbname={db}").start()
        wait_for(lambda: a.stats()["db_retries"] >= 2, 30, "two failed connect cycles")
        line = next(l for l in a.log().splitlines()
                    if "[writer] cannot connect to PostgreSQL (" in l)
        assert "::1 port" in line and "127.0.0.1 port" in line, line
    finally:
        tcp_pg.resume()
    try:
        log_one_point(a, tcp_pg, db, timeout_ms=60000)
    finally:
        assert a.stop() == 0


def localhost_addresses(prefix=()):
    """The addresses getaddrinfo gives for localhost, in its order (getent ahosts)."""
    p = subprocess.run([*prefix, "getent", "ahosts", "localhost"], capture_output=True,
                       text=True)
    if p.returncode != 0:
        return []
    out = []
    for line in p.stdout.splitlines():
        addr = line.split()[0]
        if addr not in out:
            out.append(addr)
    return out


def test_localhost_resolving_to_ipv6_first(tcp_pg, tmp_path, artifact_root):
    """A stock Debian /etc/hosts: localhost is ::1 before 127.0.0.1 for getaddrinfo. Where this
    machine's /etc/hosts says otherwise, the agent runs in a mount namespace of its own whose
    /etc/hosts says so (a chroot cannot make one; a stock machine needs none)."""
    db = tcp_pg.mlflow_db("conn_localhost")
    a = agent_on(tcp_pg, db, tmp_path, artifact_root,
                 f"host=localhost port={tcp_pg.port} user=postgres dbname={db}")
    if localhost_addresses()[:2] != ["::1", "127.0.0.1"]:
        hosts = tmp_path / "hosts"
        hosts.write_text("::1 localhost ip6-localhost ip6-loopback\n127.0.0.1 localhost\n")
        wrapper = tmp_path / "with-hosts"
        wrapper.write_text(f'#!/bin/sh\nmount --bind {hosts} /etc/hosts && exec "$@"\n')
        wrapper.chmod(0o755)
        prefix = ["unshare", "-m", str(wrapper)]
        if os.geteuid() != 0 or shutil.which("unshare") is None or \
                localhost_addresses(prefix)[:2] != ["::1", "127.0.0.1"]:
            pytest.skip("localhost is not ::1 first here, and no mount namespace can make it so")
        a.command = prefix + a.command
    a.start()
    try:
        log_one_point(a, tcp_pg, db)
        failed, connected = connect_lines(a)
        check_went_straight_on(a, failed, 1)
        assert "at localhost (::1) port" in failed[0], failed
        assert "on localhost port" in connected, connected
    finally:
        assert a.stop() == 0
