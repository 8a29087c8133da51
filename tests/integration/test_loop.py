"""Nothing the agent waits for outside itself blocks its loop. A test-only preload library
(tests/preload/slowlib.c) makes one uid's NSS lookup, or one host name's resolution, take
2 s, as a stalled LDAP server or DNS resolver does; other clients are served meanwhile (the
library writes its log line when the slow call ends, so the tests check order, not time)."""
import os
import pwd
import shutil
import tempfile
import time
from pathlib import Path

import pytest
from harness import BUILD, Agent, wait_for
from rawproto import KINDS, Raw, frame

SLOWLIB = BUILD / "libtrackd_slowlib.so"
DELAY_MS = 2000
SLOW_UID = 64001  # no passwd entry: the agent names it by its number
TS0 = 1_700_000_000_000


@pytest.fixture
def base():
    """A directory every uid may traverse, for a socket every uid may use."""
    d = Path(tempfile.mkdtemp(prefix="trackd-loop-"))
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def slow_agent(pg, db, base, **slow):
    """An agent (default configuration but an open socket) run with slowlib preloaded."""
    a = Agent(pg, db, base / "agent")
    os.chmod(base / "agent", 0o755)
    a.config.write_text(a.config.read_text().replace("[agent]\n", "[agent]\nsocket_mode = 0o666\n", 1))
    a.env = dict(os.environ, LD_PRELOAD=str(SLOWLIB), SLOWLIB_MS=str(DELAY_MS),
                 SLOWLIB_LOG=str(base / "slow.log"))
    a.env.update(slow)
    asan = a.env.get("ASAN_OPTIONS")
    # A sanitizer build's runtime must otherwise be the first library loaded.
    a.env["ASAN_OPTIONS"] = (asan + ":" if asan else "") + "verify_asan_link_order=0"
    return a.start()


def slow_calls(base):
    p = base / "slow.log"
    return p.read_text().splitlines() if p.exists() else []


def hello_seconds(client):
    t = time.monotonic()
    client.hello()
    return time.monotonic() - t


def test_a_slow_user_lookup_delays_only_its_own_connections(pg, db, base):
    """The first connection of a uid whose NSS lookup takes 2 s waits for it; root, whose name
    is known, connects, says hello and is answered meanwhile; the slow uid's next connection
    does not look it up again."""
    if os.geteuid() != 0:
        pytest.skip("needs root to connect as another uid")
    agent = slow_agent(pg, db, base, SLOWLIB_UID=str(SLOW_UID))
    try:
        t0 = time.monotonic()
        slow, = Raw.connected_as(agent.socket, SLOW_UID, SLOW_UID, timeout=30)
        slow.send(frame("hello", [1, 4242, "raw", "raw.py", "LOCAL", "rawproto"], seq=1))
        # The agent's own uid (root here) is named at start, before anyone is served.
        wait_for(lambda: agent.stats()["user_lookups"] >= 1, 10, "the slow lookup to start")
        others = []
        for _ in range(5):
            root = Raw(agent.socket)
            others.append(hello_seconds(root))
            root.close()
        # slowlib writes its line when the lookup ends: root was answered before that.
        during = slow_calls(base)
        kind, _, _ = slow.read()
        slow_s = time.monotonic() - t0
        assert kind == KINDS["welcome"]
        again, = Raw.connected_as(agent.socket, SLOW_UID, SLOW_UID, timeout=30)
        again_s = hello_seconds(again)
        stats = agent.stats()
        print(f"\nscenario=slow-nss-lookup delay_ms={DELAY_MS} slow_client_s={slow_s:.2f} "
              f"other_clients_max_s={max(others):.3f} cached_again_s={again_s:.3f} "
              f"lookups={stats['user_lookups']} slow={stats['user_lookups_slow']}")
        assert during == [], "root waited for another uid's lookup"
        assert slow_calls(base) == [f"uid {SLOW_UID}"]  # one lookup, over before the welcome
        assert stats["user_lookups"] == 1 and stats["user_lookups_slow"] == 1
        assert "NSS took" in agent.log() and f"to name uid {SLOW_UID}" in agent.log()
        for c in (slow, again):
            c.close()
    finally:
        assert agent.stop() == 0


def test_a_user_lookup_that_never_ends_names_the_uid_by_number(pg, db, base):
    """NSS does not answer for nobody within the agent's 10 s: the connection goes on with
    the uid's number as its user name (logged and counted), and the lookup, which goes on,
    names nobody's next connection."""
    if os.geteuid() != 0:
        pytest.skip("needs root to connect as another uid")
    nobody = pwd.getpwnam("nobody")
    agent = slow_agent(pg, db, base, SLOWLIB_UID=str(nobody.pw_uid), SLOWLIB_MS="12000")
    try:
        t0 = time.monotonic()
        first, = Raw.connected_as(agent.socket, nobody.pw_uid, nobody.pw_gid, timeout=30)
        first.hello()
        waited = time.monotonic() - t0
        during = slow_calls(base)
        timeouts = agent.stats()["user_lookup_timeouts"]
        wait_for(lambda: slow_calls(base) == [f"uid {nobody.pw_uid}"], 30,
                 "the lookup to end")
        second, = Raw.connected_as(agent.socket, nobody.pw_uid, nobody.pw_gid, timeout=30)
        second_s = hello_seconds(second)
        stats = agent.stats()
        log = agent.log()
        print(f"\nscenario=nss-never-answers waited_s={waited:.2f} second_s={second_s:.3f} "
              f"timeouts={stats['user_lookup_timeouts']} lookups={stats['user_lookups']}")
        assert during == [] and timeouts == 1, "welcomed only when the lookup ended"
        assert stats["user_lookup_timeouts"] == 1 and stats["user_lookups"] == 1
        assert (f"no user name for uid {nobody.pw_uid} after 10000 ms (NSS does not answer): "
                "its connection goes on with the number as its user name") in log
        for c in (first, second):
            c.close()
    finally:
        assert agent.stop() == 0


SLOW_HOST = "postgres.slow.trackd.test"


def test_a_slow_host_name_does_not_delay_acknowledgements(tcp_pg, base, artifact_root):
    """[postgres] dsn names a host whose resolution takes 2 s. The writer resolves it on the
    threadpool (uv_getaddrinfo) and hands libpq the address: meanwhile a client's frames are
    journaled and acknowledged at once, and they are written once the name resolves."""
    db = tcp_pg.mlflow_db("slow_host")
    agent = Agent(tcp_pg, db, base / "agent", artifact_root=str(artifact_root))
    agent.config.write_text(agent.config.read_text().replace(
        f'dsn = "{tcp_pg.dsn(db)}"',
        f'dsn = "host={SLOW_HOST} port={tcp_pg.port} dbname={db} user=postgres"'))
    agent.env = dict(os.environ, LD_PRELOAD=str(SLOWLIB), SLOWLIB_MS=str(DELAY_MS),
                     SLOWLIB_LOG=str(base / "slow.log"), SLOWLIB_HOST=SLOW_HOST)
    asan = agent.env.get("ASAN_OPTIONS")
    agent.env["ASAN_OPTIONS"] = (asan + ":" if asan else "") + "verify_asan_link_order=0"
    agent.start()
    try:
        c = Raw(agent.socket, timeout=30)
        t0 = time.monotonic()
        c.send(frame("hello", [1, 4242, "raw", "raw.py", "LOCAL", "rawproto", True, 77], seq=1))
        run_id = "5" * 32
        c.send(frame("start_run", [run_id, "slow-host-exp", "r", TS0, []], seq=2) +
               frame("metrics", [run_id, ["loss", 0.5, TS0, 1]], seq=3))
        acked = 0
        while acked < 3:
            kind, _, body = c.read(acks=True)
            assert kind in (KINDS["welcome"], KINDS["ack"]), body
            if kind == KINDS["ack"]:
                acked = body[1] if body[0] == 0x91 else 0
        ack_s = time.monotonic() - t0
        connects_at_ack = agent.stats()["db_connects"]
        c.send(frame("flush", [], seq=4))
        kind = None
        while kind != KINDS["flushed"]:
            kind, _, body = c.read()
            assert kind != KINDS["error"], body
        flushed_s = time.monotonic() - t0
        c.close()
        print(f"\nscenario=slow-host-name delay_ms={DELAY_MS} ack_s={ack_s:.3f} "
              f"flushed_s={flushed_s:.2f} connects_at_ack={connects_at_ack}")
        assert connects_at_ack == 0, "the writer connected before the acknowledgement"
        assert tcp_pg.query(db, "SELECT key, value, step FROM metrics WHERE run_uuid = %s",
                            (run_id,)) == [("loss", 0.5, 1)]
        assert f"host {SLOW_HOST}" in slow_calls(base)
    finally:
        assert agent.stop() == 0
