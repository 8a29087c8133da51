"""Deployment: the systemd unit in agent/systemd (systemd accepts it, and its hardening keeps the
exposure score systemd-analyze gives it low), and the agent running as an unprivileged user."""
import os
import pwd
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from harness import BUILD, driver_runs, run_driver, wait_for

UNIT = BUILD.parent / "agent" / "systemd" / "trackd.service"


@pytest.fixture
def unit(tmp_path):
    # ./trackd-dev test installs it (Debian package systemd); only a hand-run suite may skip.
    if shutil.which("systemd-analyze") is None and not os.environ.get("CI"):
        pytest.skip("systemd-analyze is not installed")
    # The unit names the installed binary; point it at the one built here.
    path = tmp_path / "trackd.service"
    path.write_text(UNIT.read_text().replace("/usr/local/bin/trackd", str(BUILD / "trackd")))
    return path


def test_unit_verifies(unit):
    p = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    text = UNIT.read_text()
    for line in ("User=trackd", "NoNewPrivileges=yes", "ProtectSystem=strict", "PrivateTmp=yes",
                 "RuntimeDirectory=trackd", "StateDirectory=trackd", "CapabilityBoundingSet=\n"):
        assert line in text, line


def test_unit_exposure_is_low(unit):
    p = subprocess.run(["systemd-analyze", "security", "--offline=true", str(unit)],
                       capture_output=True, text=True, timeout=120)
    m = re.search(r"Overall exposure level for trackd.service: ([0-9.]+)", p.stdout + p.stderr)
    assert m, p.stdout[-2000:] + p.stderr[-2000:]
    print(f"\nsystemd-analyze security: exposure {m.group(1)} (0 = fully locked down, 10 = none)")
    assert float(m.group(1)) <= 2.0


def test_journal_is_private_and_its_parents_are_not(pg, db, tmp_path):
    """The agent makes the journal's missing parents 0755 (the default artifact store sits
    beside the journal, under /var/lib/trackd) and the journal itself 0700."""
    from harness import Agent

    top = tmp_path / "state"
    a = Agent(pg, db, tmp_path / "a")
    a.config.write_text(a.config.read_text().replace(
        str(a.workdir / "journal"), str(top / "trackd" / "journal")))
    old = os.umask(0o022)
    try:
        a.start()
    finally:
        os.umask(old)
    try:
        assert (top.stat().st_mode & 0o777, (top / "trackd").stat().st_mode & 0o777,
                (top / "trackd" / "journal").stat().st_mode & 0o777) == (0o755, 0o755, 0o700)
    finally:
        assert a.stop() == 0


def test_agent_runs_unprivileged(pg, db, tmp_path, artifact_root):
    """As the unit runs it: a user with no privileges, owning only its socket directory and
    journal. Points logged through it land, and it does not warn about running as root."""
    if os.geteuid() != 0:
        pytest.skip("needs root to start the agent as another user")
    nobody = pwd.getpwnam("nobody")
    home = Path(tempfile.mkdtemp(prefix="trackd-unpriv-"))
    os.chmod(home, 0o755)
    for d in (home / "run", home / "state"):
        d.mkdir()
        os.chown(d, nobody.pw_uid, nobody.pw_gid)
    cfg = home / "agent.toml"
    cfg.write_text(f'[agent]\nsocket = "{home / "run" / "trackd.sock"}"\n'
                   f'[postgres]\ndsn = "{pg.dsn(db)}"\n'
                   f'[mlflow]\ndefault_artifact_root = "{artifact_root}"\n'
                   f'[journal]\ndir = "{home / "state" / "journal"}"\n')
    log = open(home / "agent.log", "wb")

    def as_nobody():
        os.setgroups([])
        os.setgid(nobody.pw_gid)
        os.setuid(nobody.pw_uid)
    p = subprocess.Popen([str(BUILD / "trackd"), "--config", str(cfg)], preexec_fn=as_nobody,
                         stdout=log, stderr=subprocess.STDOUT)
    try:
        text = lambda: (home / "agent.log").read_text()  # noqa: E731
        wait_for(lambda: "[agent] ready" in text() or p.poll() is not None, 30, "the agent to start")
        assert p.poll() is None, text()
        out, _ = run_driver(str(home / "run" / "trackd.sock"),
                            [["run", "r", "unpriv-exp", "", "now"], ["metric", "r", "m", "1", "0", "1700000000000"],
                             ["flush", "30000"]])
        assert ["flush", "0"] in out
        run_id = driver_runs(out)["r"]
        assert pg.query(db, "SELECT count(*) FROM metrics WHERE run_uuid = %s", (run_id,)) == [(1,)]
        assert "running as root" not in text()
        st = os.stat(home / "state" / "journal")
        assert (st.st_uid, st.st_mode & 0o777) == (nobody.pw_uid, 0o700)
    finally:
        p.terminate()
        assert p.wait(30) == 0
        log.close()
        shutil.rmtree(home, ignore_errors=True)


def test_sighup_reloads_log_level_and_names_the_rest(pg, db, tmp_path):
    """SIGHUP does not stop the agent: it rereads its file, applies [agent] log_level, names
    every other changed key as needing a restart, and ignores a file that does not load."""
    import signal

    from harness import Agent

    a = Agent(pg, db, tmp_path / "a", log_level="info").start()
    try:
        text = a.config.read_text()
        a.config.write_text(text.replace('log_level = "info"', 'log_level = "debug"')
                            .replace("shutdown_grace_ms = 20000", "shutdown_grace_ms = 15000"))
        a.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "agent.log_level is now debug" in a.log(), 10, "the reload")
        assert ("SIGHUP: agent.shutdown_grace_ms changed; it takes effect at the next restart"
                in a.log())
        out, _ = run_driver(a.socket, [["run", "r", "hup-exp", "h", "now"], ["flush", "30000"]])
        assert ["flush", "0"] in out
        assert "DEBUG" in a.log()  # the new level is in effect

        a.config.write_text(text.replace('log_level = "info"', 'log_level = "loud"'))
        a.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "the configuration does not load" in a.log(), 10, "the refusal")
        assert a.proc.poll() is None
        out, _ = run_driver(a.socket, [["run", "r", "hup-exp", "h2", "now"], ["flush", "30000"]])
        assert ["flush", "0"] in out
    finally:
        assert a.stop() == 0
