"""The database password and transport: TLS with sslmode=verify-full against a CA made here,
the password given inline, in password_file, or in a PGPASSFILE, and never printed: not in the
log, `trackd stats`, the process title or error messages."""
import os
import pwd
import subprocess

import pytest
from harness import BUILD, Agent, TcpPostgres, driver_runs, run_driver, wait_for

PASSWORD = "pw-Sekret-4711"
TS0 = 1_700_000_000_000


def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def tls(artifact_root):
    pg = TcpPostgres()  # listening on 127.0.0.1 with TLS and SCRAM passwords, below
    pg.start()
    d = pg.dir / "tls"
    d.mkdir()
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
            "-days", "2", "-subj", "/CN=trackd test CA", cwd=d)
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
            "-subj", "/CN=localhost", cwd=d)
    (d / "san.ext").write_text("subjectAltName=DNS:localhost\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "server.crt", "-days", "2", "-extfile", "san.ext", cwd=d)
    if os.geteuid() == 0:
        pw = pwd.getpwnam("postgres")
        for f in d.iterdir():
            os.chown(f, pw.pw_uid, pw.pw_gid)
    os.chmod(d / "server.key", 0o600)
    pg.pause()
    # Database tls_clear refuses TLS and takes clear connections: sslmode=prefer's fallback.
    (pg.data / "pg_hba.conf").write_text("local all all trust\n"
                                         "hostssl tls_clear all 127.0.0.1/32 reject\n"
                                         "hostnossl tls_clear all 127.0.0.1/32 trust\n"
                                         "hostssl all all 127.0.0.1/32 scram-sha-256\n")
    pg.opts = (f"-k {pg.dir} -p {pg.port} -c listen_addresses=127.0.0.1 -c ssl=on "
               f"-c ssl_cert_file={d / 'server.crt'} -c ssl_key_file={d / 'server.key'} "
               "-c fsync=off -c full_page_writes=off")
    pg.resume()
    with pg.connect() as c:
        c.execute(f"ALTER USER postgres PASSWORD '{PASSWORD}'")
    pg.bootstrap_template(artifact_root)
    pg.ca = d / "ca.crt"
    yield pg
    pg.stop()


def agent_with(tls, db, tmp_path, artifact_root, dsn):
    a = Agent(tls, db, tmp_path / "agent", artifact_root=str(artifact_root), log_level="debug")
    text = a.config.read_text()
    start = text.index('dsn = "')
    end = text.index('"\n', start + 7)
    a.config.write_text(text[:start] + f'dsn = "{dsn}"' + text[end + 1:])
    return a


def tls_dsn(tls, db, host="localhost", password=True):
    return (f"host={host} port={tls.port} user=postgres dbname={db} sslmode=verify-full "
            f"sslrootcert={tls.ca}" + (f" password={PASSWORD}" if password else ""))


def log_and_check(tls, db, a):
    out, _ = run_driver(a.socket, [["run", "r", "tls-exp", "tls", "now"],
                                   ["metric", "r", "loss", "0.5", "1", str(TS0)], ["flush", "30000"]])
    assert ["flush", "0"] in out
    run_id = driver_runs(out)["r"]
    assert tls.query(db, "SELECT value FROM metrics WHERE run_uuid = %s", (run_id,)) == [(0.5,)]
    # The agent's own connection is encrypted.
    rows = tls.query(db, "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)"
                         " WHERE a.application_name = 'trackd' AND a.datname = %s", (db,))
    assert rows and all(r[0] for r in rows), rows


def assert_never_printed(a):
    assert PASSWORD not in a.log()
    stats = subprocess.run([str(BUILD / "trackd"), "stats", "--socket", a.socket],
                           capture_output=True, text=True, check=True).stdout
    assert PASSWORD not in stats
    title = open(f"/proc/{a.proc.pid}/cmdline", "rb").read().decode(errors="replace")
    assert PASSWORD not in title
    dump = subprocess.run([str(BUILD / "trackd"), "--help"], capture_output=True, text=True).stdout
    assert PASSWORD not in dump


def test_inline_password_over_verify_full(tls, tmp_path, artifact_root):
    db = tls.mlflow_db("tls_inline")
    a = agent_with(tls, db, tmp_path, artifact_root, tls_dsn(tls, db)).start()
    try:
        log_and_check(tls, db, a)
        assert_never_printed(a)
        # --check-config prints the configuration's DSN masked.
        p = subprocess.run([str(BUILD / "trackd"), "--check-config", str(a.config)],
                           capture_output=True, text=True)
        assert p.returncode == 0 and PASSWORD not in p.stdout + p.stderr
    finally:
        assert a.stop() == 0
    assert PASSWORD not in a.log()


def test_password_file(tls, tmp_path, artifact_root):
    db = tls.mlflow_db("tls_pwfile")
    pwfile = tmp_path / "pgpw"
    pwfile.write_text(PASSWORD + "\n")
    os.chmod(pwfile, 0o600)
    a = agent_with(tls, db, tmp_path, artifact_root, tls_dsn(tls, db, password=False))
    text = a.config.read_text().replace("[postgres]\n", f'[postgres]\npassword_file = "{pwfile}"\n')
    a.config.write_text(text)
    a.start()
    try:
        log_and_check(tls, db, a)
        assert_never_printed(a)
    finally:
        assert a.stop() == 0


def test_pgpassfile(tls, tmp_path, artifact_root, monkeypatch):
    db = tls.mlflow_db("tls_pgpass")
    passfile = tmp_path / "pgpass"
    passfile.write_text(f"localhost:{tls.port}:*:postgres:{PASSWORD}\n")
    os.chmod(passfile, 0o600)
    monkeypatch.setenv("PGPASSFILE", str(passfile))
    a = agent_with(tls, db, tmp_path, artifact_root, tls_dsn(tls, db, password=False)).start()
    try:
        log_and_check(tls, db, a)
        assert_never_printed(a)
    finally:
        assert a.stop() == 0


def test_verify_full_refuses_a_server_whose_name_does_not_match(tls, tmp_path, artifact_root):
    """The certificate names localhost; connecting to 127.0.0.1 under verify-full must fail,
    and the agent must say why and write nothing (events wait in its journal)."""
    db = tls.mlflow_db("tls_mismatch")
    a = agent_with(tls, db, tmp_path, artifact_root, tls_dsn(tls, db, host="127.0.0.1")).start()
    try:
        run_driver(a.socket, [["run", "r", "tls-exp", "refused", "now"], ["flush", "500"]], check=False)
        wait_for(lambda: 'does not match host name "127.0.0.1"' in a.log(), 30,
                 "the agent to report the certificate mismatch")
        assert tls.query(db, "SELECT count(*) FROM runs WHERE name = 'refused'") == [(0,)]
        assert a.stats()["db_connected"] == 0
        assert PASSWORD not in a.log()
    finally:
        assert a.stop() == 0


def test_sslmode_prefer_retries_in_the_clear_on_a_new_socket(tls, tmp_path, artifact_root):
    """The server refuses the TLS connection, so libpq closes that socket and connects again
    without TLS; the new socket usually gets the old one's number. The writer must follow it."""
    db = tls.mlflow_db("tls_clear")
    a = agent_with(tls, db, tmp_path, artifact_root,
                   f"host=127.0.0.1 port={tls.port} user=postgres dbname={db} sslmode=prefer").start()
    try:
        out, _ = run_driver(a.socket, [["run", "r", "tls-exp", "clear", "now"],
                                       ["metric", "r", "loss", "0.5", "1", str(TS0)],
                                       ["flush", "30000"]])
        assert ["flush", "0"] in out
        assert tls.query(db, "SELECT value FROM metrics WHERE run_uuid = %s",
                         (driver_runs(out)["r"],)) == [(0.5,)]
        # Both writer connections (the default two), each in the clear.
        wait_for(lambda: a.stats()["db_connections"] == 2, 30, "the second writer connection")
        rows = tls.query(db, "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)"
                             " WHERE a.application_name = 'trackd' AND a.datname = %s", (db,))
        assert rows == [(False,), (False,)], rows
        assert a.stats()["db_retries"] == 0
    finally:
        assert a.stop() == 0


def test_a_dsn_libpq_cannot_parse_is_refused_without_echoing_it(tmp_path):
    """libpq's parse errors quote pieces of the string: here the piece is the password."""
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'[agent]\nsocket = "{tmp_path / "s.sock"}"\n[postgres]\n'
                   f'dsn = "host=/nonexistent password={PASSWORD} {PASSWORD}"\n'
                   f'[journal]\ndir = "{tmp_path / "journal"}"\n')
    for args in (["--config", str(cfg)], ["--check-config", str(cfg)]):
        p = subprocess.run([str(BUILD / "trackd"), *args], capture_output=True, text=True, timeout=30)
        assert p.returncode == 1, (args, p.stdout, p.stderr)
        assert ('[postgres] dsn is not a usable libpq connection string: missing "=" after "..." in '
                "connection info string") in p.stderr
        assert PASSWORD not in p.stdout + p.stderr
