"""Artifacts: files handed to the agent as descriptors, spooled, uploaded to the run's
artifact store and recorded in trackd_artifacts; MLflow lists and downloads them."""
import hashlib
import os
import select
from pathlib import Path

import pytest

from harness import BUILD, Agent, run_driver, wait_for

TS0 = 1_700_000_000_000


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def make_file(path, size, seed=0):
    """size bytes that differ per file, written in 1 MiB pieces."""
    piece = hashlib.sha256(str(seed).encode()).digest() * (1 << 15)  # 1 MiB
    with open(path, "wb") as f:
        left = size
        while left > 0:
            f.write(piece[:min(left, len(piece))])
            left -= min(left, len(piece))
    return path


def test_local_store_sizes_listed_and_downloaded_by_mlflow(pg, db, agent, artifact_root, tmp_path):
    """0 B, 1 KiB and 512 MiB files, each deleted by the caller right after the call: MLflow's
    list_artifacts and download_artifacts return identical bytes, and the ledger has each
    with its size and sha256."""
    src = tmp_path / "src"
    src.mkdir()
    files = {"empty.bin": 0, "small.txt": 1024, "big.bin": 512 << 20}
    for i, (name, size) in enumerate(files.items()):
        make_file(src / name, size, seed=i)
    digests = {n: sha256(src / n) for n in files}
    lines = [["run", "r", "art-exp", "a", "now"]]
    lines += [["artifact", "r", str(src / n), "outputs" if n != "small.txt" else ""]
              for n in files]
    # The files go away at once: the descriptors the agent holds are what it copies.
    lines += [["flush", "60000"]]
    import subprocess
    p = subprocess.Popen([str(BUILD / "trackd-driver"), "--socket", agent.socket],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    p.stdin.write("\n".join("\t".join(l) for l in lines[:1 + len(files)]) + "\n")
    p.stdin.flush()
    run_id = p.stdout.readline().split("\t")[2].strip()
    rcs = [p.stdout.readline().strip() for _ in files]
    assert rcs == ["artifact\t0"] * len(files), rcs
    for n in files:
        os.unlink(src / n)
    out, _ = p.communicate("flush\t60000\nerrors\n", timeout=120)
    assert "flush\t0" in out, out
    assert "error" not in out, out

    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=pg.url(db))
    listed = {a.path: a.file_size for a in client.list_artifacts(run_id)}
    assert listed.get("small.txt") == 1024, listed
    inner = {a.path: a.file_size for a in client.list_artifacts(run_id, "outputs")}
    assert inner == {"outputs/empty.bin": 0, "outputs/big.bin": 512 << 20}, inner
    dl = tmp_path / "dl"
    dl.mkdir()
    local = client.download_artifacts(run_id, "", str(dl))
    for n in files:
        rel = n if n == "small.txt" else f"outputs/{n}"
        assert sha256(os.path.join(local, rel)) == digests[n], n

    rows = pg.query(db, "SELECT path, size, sha256, status, store_uri FROM trackd_artifacts"
                        " WHERE run_uuid = %s ORDER BY path", (run_id,))
    assert [(r[0], r[1], r[2], r[3]) for r in rows] == sorted(
        [(n if n == "small.txt" else f"outputs/{n}", s, digests[n], "done")
         for n, s in files.items()])
    run_uri = client.get_run(run_id).info.artifact_uri
    assert all(r[4].startswith(run_uri.rstrip("/") + "/") for r in rows), (rows, run_uri)
    st = agent.stats()
    assert st["artifacts_received"] == 3 and st["artifacts_uploaded"] == 3
    assert st["artifact_bytes_uploaded"] == sum(files.values())
    wait_for(lambda: agent.stats()["artifacts_pending"] == 0, 30, "the spool to empty")
    spool = agent.workdir / "journal" / "artifacts"
    assert os.listdir(spool) == []


MLFLOW_SCRIPT = '''
import hashlib, json, os, sys, time
import mlflow
from mlflow import MlflowClient

src = sys.argv[1]
with mlflow.start_run(run_name="with-artifacts") as run:
    t0 = time.perf_counter()
    mlflow.log_artifact(os.path.join(src, "model.bin"), "checkpoints")
    took = time.perf_counter() - t0
    os.unlink(os.path.join(src, "model.bin"))     # gone at once: the agent holds the file
    mlflow.log_artifacts(os.path.join(src, "plots"), "plots")
    mlflow.log_metric("loss", 0.5, step=1)
# Reads through trackd: wait for the uploads (the store's barrier) and see them.
client = MlflowClient()
listed = sorted((a.path, a.file_size) for a in client.list_artifacts(run.info.run_id, "plots"))
local = client.download_artifacts(run.info.run_id, "checkpoints/model.bin", sys.argv[2])
digest = hashlib.sha256(open(local, "rb").read()).hexdigest()
print(json.dumps({"run": run.info.run_id, "took": took, "listed": listed, "sha": digest}))
'''


def test_mlflow_log_artifact_under_trackd(pg, tmp_path, artifact_root):
    """mlflow.log_artifact(s) under trackd: hands files to the agent and returns at once;
    MLflow reads them back from the store the run names, byte-identical."""
    import json
    import subprocess
    import sys

    work = tmp_path / "work"
    (work / "src" / "plots" / "epoch1").mkdir(parents=True)
    size = 512 << 20
    make_file(work / "src" / "model.bin", size, seed=7)
    want = sha256(work / "src" / "model.bin")
    make_file(work / "src" / "plots" / "loss.png", 3000, seed=8)
    make_file(work / "src" / "plots" / "epoch1" / "acc.png", 5, seed=9)
    (work / "dl").mkdir()
    (work / "script.py").write_text(MLFLOW_SCRIPT)
    db = pg.mlflow_db("artifacts_plugin")
    # MLflow made the Default experiment below the session's artifact root: the operator
    # allows that root too.
    agent = Agent(pg, db, tmp_path / "agent", artifact_root=str(work / "mlruns"),
                  extra=f'[artifacts]\nallowed_roots = "{artifact_root}"\n')
    agent.config.write_text(agent.config.read_text().replace(
        "[mlflow]\n", f'[mlflow]\nbackend_uri = "{pg.url(db)}"\n'))
    agent.start()
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "TRACKD_"))}
        env["MLFLOW_TRACKING_URI"] = f"trackd://{agent.socket}"
        p = subprocess.run([sys.executable, "script.py", str(work / "src"), str(work / "dl")],
                           cwd=work, env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-4000:]
        out = json.loads(p.stdout.strip().splitlines()[-1])
        st = agent.stats()
    finally:
        assert agent.stop() == 0
    print(f"\nmlflow.log_artifact of {size >> 20} MiB under trackd: returned in "
          f"{out['took'] * 1000:.1f} ms")
    assert out["sha"] == want
    assert out["listed"] == [["plots/epoch1", None], ["plots/loss.png", 3000]], out["listed"]
    assert st["artifacts_uploaded"] == 3 and st["artifacts_failed"] == 0
    rows = pg.query(db, "SELECT path, size, status FROM trackd_artifacts ORDER BY path")
    assert rows == [("checkpoints/model.bin", size, "done"), ("plots/epoch1/acc.png", 5, "done"),
                    ("plots/loss.png", 3000, "done")]


def test_mlflow_artifacts_store_down_30s(pg, db, tmp_path):
    """mlflow-artifacts: through a real `mlflow server --serve-artifacts`: 0 B, 1 KiB and
    512 MiB land byte-identical. Then the server stops for 30 s while another artifact
    waits: the agent retries with backoff, and it lands once the server is back; flush
    waits for it."""
    import subprocess
    import time

    from mlflow.tracking import MlflowClient
    from mlflow_server import MlflowServer
    from harness import BUILD

    server = MlflowServer(pg.url(db), tmp_path / "srv").start()
    try:
        a = Agent(pg, db, tmp_path / "a", artifact_root="mlflow-artifacts:/",
                  extra=f'[artifacts]\nmlflow_server_url = "{server.url}"\n').start()
        src = tmp_path / "src"
        src.mkdir()
        sizes = {"empty.bin": 0, "small.txt": 1024, "big.bin": 512 << 20, "during.bin": 8 << 20}
        for i, (n, size) in enumerate(sizes.items()):
            make_file(src / n, size, seed=30 + i)
        digests = {n: sha256(src / n) for n in sizes}
        p = subprocess.Popen([str(BUILD / "trackd-driver"), "--socket", a.socket],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        try:
            p.stdin.write("run\tr\tstore-exp\ts\tnow\n" + "".join(
                f"artifact\tr\t{src / n}\tm\n" for n in ("empty.bin", "small.txt", "big.bin"))
                + "flush\t300000\n")
            run_id = p.stdout.readline().split("\t")[2].strip()
            for _ in range(3):
                assert p.stdout.readline().strip() == "artifact\t0"
            assert p.stdout.readline().strip() == "flush\t0"
            server.stop()
            down_at = time.monotonic()
            p.stdin.write(f"artifact\tr\t{src / 'during.bin'}\tm\nflush\t120000\n")
            assert p.stdout.readline().strip() == "artifact\t0"
            wait_for(lambda: a.stats()["artifact_retries"] > 0, 30, "the agent to retry")
            # Another client's flush covers only what that client logged: it does not wait
            # for this upload (it did, for the whole outage, when barriers waited for any).
            out, _ = run_driver(a.socket, [["run", "o", "store-exp", "other", "now"],
                                           ["metric", "o", "m", "1", "0", "1700000000000"],
                                           ["flush", "20000"]], timeout=60)
            assert ["flush", "0"] in out, out
            assert time.monotonic() - down_at < 30, "the other flush outlasted the outage"
            assert select.select([p.stdout], [], [], 0)[0] == [], "the upload's flush returned"
            wait_for(lambda: time.monotonic() - down_at >= 30, 40, "the 30 s outage")
            server.restart()
            assert p.stdout.readline().strip() == "flush\t0"
            p.stdin.write("errors\n")
            p.stdin.close()
            rest = p.stdout.read()
            assert p.wait(60) == 0 and "error" not in rest, rest
        finally:
            p.kill()
        st = a.stats()
        assert a.stop() == 0
        client = MlflowClient(tracking_uri=server.url)
        # MLflow's artifact proxy reports an empty file's size as unset (protobuf's 0).
        listed = {f.path: f.file_size or 0 for f in client.list_artifacts(run_id, "m")}
        assert listed == {f"m/{n}": s for n, s in sizes.items()}, listed
        dl = tmp_path / "dl"
        dl.mkdir()
        local = client.download_artifacts(run_id, "m", str(dl))
        for n, d in digests.items():
            assert sha256(os.path.join(local, n)) == d, n
        rows = pg.query(db, "SELECT path, status, store_uri FROM trackd_artifacts ORDER BY path")
        assert [(r[0], r[1]) for r in rows] == sorted((f"m/{n}", "done") for n in sizes)
        assert rows[0][2].startswith("mlflow-artifacts:/"), rows
        print(f"\nscenario=artifact-store-down-30s sent=4 uploaded={st['artifacts_uploaded']} "
              f"retries={st['artifact_retries']} failed={st['artifacts_failed']}")
        assert st["artifacts_uploaded"] == 4 and st["artifacts_failed"] == 0
    finally:
        server.stop()


def test_agent_kill9_during_large_upload_resumes(pg, db, tmp_path, artifact_root):
    """A 512 MiB artifact: the agent is killed with SIGKILL while uploading it. The next
    agent finds it in the spool, uploads it again, and the flush the client started before
    the crash returns once the bytes are in place, identical."""
    import glob
    import signal
    import subprocess

    src = tmp_path / "big.bin"
    size = 512 << 20
    make_file(src, size, seed=11)
    want = sha256(src)
    a = Agent(pg, db, tmp_path / "a", artifact_root=str(artifact_root)).start()
    p = subprocess.Popen([str(BUILD / "trackd-driver"), "--socket", a.socket],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
    b = None
    try:
        p.stdin.write(f"run\tr\tkill-art-exp\tk\tnow\nartifact\tr\t{src}\tckpt\nflush\t180000\n")
        run_id = p.stdout.readline().split("\t")[2].strip()
        assert p.stdout.readline().strip() == "artifact\t0"
        os.unlink(src)
        # Kill while the copy into the store runs (its temporary file exists), or at the
        # latest once the snapshot is spooled and the upload has not finished.
        tmp_glob = f"{artifact_root}/*/{run_id}/artifacts/ckpt/big.bin.trackd-*.tmp"
        wait_for(lambda: glob.glob(tmp_glob) or a.stats()["artifacts_uploaded"] > 0, 120,
                 "the upload to start")
        caught = bool(glob.glob(tmp_glob))
        os.kill(a.proc.pid, signal.SIGKILL)
        a.proc.wait()
        spool = tmp_path / "a" / "journal" / "artifacts"
        assert len(glob.glob(f"{spool}/*.data")) == 1
        b = Agent(pg, db, tmp_path / "a", artifact_root=str(artifact_root)).start()
        assert "spooled artifact(s) from before the restart resume" in b.log()
        assert p.stdout.readline().strip() == "flush\t0"
        p.stdin.close()
        assert p.wait(60) == 0
        dest = glob.glob(f"{artifact_root}/*/{run_id}/artifacts/ckpt/big.bin")
        assert len(dest) == 1 and os.path.getsize(dest[0]) == size
        assert sha256(dest[0]) == want
        assert glob.glob(tmp_glob) == []
        rows = pg.query(db, "SELECT size, sha256, status FROM trackd_artifacts"
                            " WHERE run_uuid = %s", (run_id,))
        assert rows == [(size, want, "done")]
        wait_for(lambda: glob.glob(f"{spool}/*") == [], 30, "the spool to empty")
        print(f"\nscenario=agent-kill-9-during-upload size={size} caught_mid_copy={caught} "
              f"uploaded_after_restart={b.stats()['artifacts_uploaded']}")
    finally:
        p.kill()
        a.kill()
        if b is not None:
            assert b.stop() == 0


def test_seed_views_and_cli(pg, db, tmp_path, artifact_root):
    """[postgres] seed_views = true: the mlflow_* views answer the usual queries;
    `trackd artifacts RUN_ID` lists the ledger; `trackd views drop` removes the views."""
    import subprocess

    a = Agent(pg, db, tmp_path / "a", artifact_root=str(artifact_root))
    a.config.write_text(a.config.read_text().replace("[postgres]\n",
                                                     "[postgres]\nseed_views = true\n"))
    a.start()
    try:
        f = make_file(tmp_path / "notes.txt", 100, seed=3)
        out, _ = run_driver(a.socket, [["run", "r", "views-exp", "view-run", "now"],
                                       ["param", "r", "learning_rate", "0.01"],
                                       ["artifact", "r", str(f), ""], ["flush", "30000"]])
        run_id = next(l[2] for l in out if l[0] == "run")
        assert ["flush", "0"] in out
        assert pg.query(db, "SELECT run_uuid, run_name FROM mlflow_runs WHERE run_uuid = %s",
                        (run_id,)) == [(run_id, "view-run")]
        assert pg.query(db, "SELECT key, value FROM mlflow_params WHERE run_uuid = %s"
                            " AND key = 'learning_rate'", (run_id,)) == [("learning_rate", "0.01")]
        assert pg.query(db, "SELECT path, size, status FROM mlflow_artifacts WHERE run_uuid = %s",
                        (run_id,)) == [("notes.txt", 100, "done")]
        for v in ("mlflow_metrics", "mlflow_tags", "mlflow_experiments",
                  "mlflow_registered_models", "mlflow_model_versions"):
            pg.query(db, f"SELECT count(*) FROM {v}")
    finally:
        assert a.stop() == 0
    ls = subprocess.run([str(BUILD / "trackd"), "artifacts", run_id, "--config", str(a.config)],
                        capture_output=True, text=True)
    assert ls.returncode == 0, ls.stderr
    assert "notes.txt" in ls.stdout and " 100 " in ls.stdout and "done" in ls.stdout
    assert sha256(f) in ls.stdout
    none = subprocess.run([str(BUILD / "trackd"), "artifacts", "0" * 32, "--config",
                           str(a.config)], capture_output=True, text=True)
    assert none.returncode == 0 and "no artifacts" in none.stdout
    drop = subprocess.run([str(BUILD / "trackd"), "views", "drop", "--config", str(a.config)],
                          capture_output=True, text=True)
    assert drop.returncode == 0, drop.stderr
    assert pg.query(db, "SELECT count(*) FROM pg_views WHERE viewname LIKE 'mlflow\\_%%'") == [(0,)]


def test_bad_artifact_frames(pg, db, agent, tmp_path):
    """Raw clients: an ARTIFACT frame without a descriptor closes that connection; a pipe
    instead of a file, a path escaping the run's root and a file larger than the spool's
    disk are refused with error 23 and the connection goes on; a good client is unaffected."""
    from rawproto import KINDS, Raw, error_fields, frame

    out, _ = run_driver(agent.socket, [["run", "r", "bad-art", "b", "now"], ["flush", "10000"]])
    run_id = next(l[2] for l in out if l[0] == "run")
    good = make_file(tmp_path / "good.txt", 10, seed=5)

    r = Raw(agent.socket)
    r.hello()
    rd, wr = os.pipe()
    r.send_with_fds(frame("artifact", [run_id, "p.bin", 0], seq=2), [rd])
    with open(good, "rb") as f:
        r.send_with_fds(frame("artifact", [run_id, "../escape", 10], seq=3), [f.fileno()])
    sparse = tmp_path / "sparse.bin"
    with open(sparse, "wb") as f:
        f.truncate(1 << 43)  # an 8 TiB sparse file: no spool here has room for its copy
    with open(sparse, "rb") as f:
        r.send_with_fds(frame("artifact", [run_id, "huge.bin", 1 << 43], seq=4), [f.fileno()])
    os.close(rd)
    os.close(wr)
    errors = []
    for _ in range(3):
        kind, _, body = r.read()
        assert kind == KINDS["error"], kind
        errors.append(error_fields(body))
    assert [(s, c) for s, c, _ in errors] == [(2, 23), (3, 23), (4, 23)], errors
    assert "not a regular file" in errors[0][2]
    assert "'.' or '..'" in errors[1][2]
    assert "no room" in errors[2][2]
    r.send(frame("flush", [], seq=5))
    assert r.read()[0] == KINDS["flushed"]
    r.close()

    r = Raw(agent.socket)
    r.hello()
    r.send(frame("artifact", [run_id, "nofd.bin", 3], seq=2))
    kind, _, body = r.read()
    assert kind == KINDS["error"] and error_fields(body)[1] == 30
    assert "without a file descriptor" in error_fields(body)[2]
    assert r.read() is None  # closed
    r.close()

    out, _ = run_driver(agent.socket, [["run", "g", "bad-art", "g", "now"],
                                       ["artifact", "g", str(good), ""], ["flush", "30000"]])
    assert ["flush", "0"] in out
    assert agent.stats()["artifacts_uploaded"] == 1
    # Refused at the door, the client told at once: nothing was accepted, nothing is
    # dead-lettered (that file is for accepted work that fails later).
    dl = agent.workdir / "journal" / "dead-letter.jsonl"
    assert not dl.exists() or dl.read_text() == ""
    assert agent.stats()["artifacts_failed"] == 3


def test_s3_store_sizes_listed_and_downloaded_by_mlflow(pg, db, tmp_path):
    """s3:// through a real S3-compatible server (S3Proxy, SigV4 enforced): 0 B and 1 KiB in
    one signed PUT, 512 MiB as a multipart upload of 64 MiB parts. MLflow's own S3
    repository (boto3) lists and downloads identical bytes."""
    from mlflow.tracking import MlflowClient
    from s3server import ACCESS_KEY, SECRET_KEY, S3Server

    s3 = S3Server(tmp_path / "s3").start()
    try:
        s3.make_bucket("mlflow")
        secret = tmp_path / "s3-secret"
        secret.write_text(SECRET_KEY + "\n")
        a = Agent(pg, db, tmp_path / "a", artifact_root="s3://mlflow/runs",
                  extra=f'[artifacts]\ns3_endpoint_url = "{s3.url}"\n'
                        f's3_access_key_id = "{ACCESS_KEY}"\n'
                        f's3_secret_access_key_file = "{secret}"\n').start()
        src = tmp_path / "src"
        src.mkdir()
        files = {"empty.bin": 0, "small.txt": 1024, "big.bin": 512 << 20}
        for i, (n, size) in enumerate(files.items()):
            make_file(src / n, size, seed=20 + i)
        digests = {n: sha256(src / n) for n in files}
        try:
            lines = [["run", "r", "s3-exp", "s", "now"]]
            lines += [["artifact", "r", str(src / n), "out"] for n in files]
            lines += [["flush", "300000"], ["errors"]]
            out, _ = run_driver(a.socket, lines)
            run_id = next(l[2] for l in out if l[0] == "run")
            assert ["flush", "0"] in out, out
            assert not [l for l in out if l[0] == "error"], out
            st = a.stats()
        finally:
            assert a.stop() == 0
        assert st["artifacts_uploaded"] == 3 and st["artifacts_failed"] == 0
        saved = {k: os.environ.get(k) for k in s3.env()}
        os.environ.update(s3.env())
        try:
            client = MlflowClient(tracking_uri=pg.url(db))
            assert client.get_run(run_id).info.artifact_uri.startswith("s3://mlflow/runs/")
            listed = {f.path: f.file_size for f in client.list_artifacts(run_id, "out")}
            assert listed == {f"out/{n}": s for n, s in files.items()}, listed
            dl = tmp_path / "dl"
            dl.mkdir()
            local = client.download_artifacts(run_id, "out", str(dl))
            for n, d in digests.items():
                assert sha256(os.path.join(local, n)) == d, n
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        rows = pg.query(db, "SELECT path, size, status FROM trackd_artifacts ORDER BY path")
        assert rows == sorted((f"out/{n}", s, "done") for n, s in files.items())
    finally:
        s3.stop()


@pytest.mark.parametrize("size", [64 * 1024, 4 * 1024 * 1024], ids=["64KiB", "4MiB"])
def test_file_rewritten_in_place_after_each_call(pg, db, agent, tmp_path, size):
    """The "save the checkpoint to model.pt every epoch" loop, with the rewrite right after
    each log_artifact (same inode, same size): a stored file is byte-identical to the file at
    its call, or nothing is stored and the client gets an error saying why. Never `done`
    with another epoch's bytes. Files up to 1 MiB are copied at the call, so all are kept."""
    import trackd

    def content(epoch):
        return (f"epoch {epoch:02d} ".encode() * (size // 9 + 1))[:size]

    trackd.errors()
    trackd.start_run("rewrite-exp", socket=agent.socket)
    run_id = trackd.active_run().run_id
    model = tmp_path / "model.pt"
    epochs = 20
    try:
        for epoch in range(epochs):
            model.write_bytes(content(epoch))  # open(O_TRUNC): the same inode every time
            trackd.log_artifact(model, f"e{epoch:02d}")
        model.write_bytes(content(99))
        try:
            trackd.flush(120)
        except trackd.TrackdError:
            pass  # the refusals, read below
        errors = trackd.errors()
        trackd.end_run()
    finally:
        trackd.shutdown(30)
    (uri,) = pg.query(db, "SELECT artifact_uri FROM runs WHERE run_uuid = %s", (run_id,))[0]
    ledger = dict(pg.query(db, "SELECT path, status FROM trackd_artifacts WHERE run_uuid = %s",
                           (run_id,)))
    stored = wrong = 0
    for epoch in range(epochs):
        path = f"e{epoch:02d}/model.pt"
        if path not in ledger:
            continue
        assert ledger[path] == "done", ledger
        data = (Path(uri.removeprefix("file://")) / path).read_bytes()
        if data == content(epoch):
            stored += 1
        else:
            wrong += 1
    refused = [e for e in errors if e[1] == 23 and "changed after log_artifact" in e[2]]
    print(f"\nscenario=in-place-rewrite-{size // 1024}KiB sent={epochs} stored={stored} "
          f"refused={len(refused)} wrong-done={wrong}")
    assert wrong == 0
    assert stored + len(refused) == epochs, (stored, errors)
    assert len(errors) == len(refused), errors
    if size <= 1024 * 1024:
        assert stored == epochs
    if refused:
        assert "write each version to a new file, or flush before rewriting it" in refused[0][2]


def test_flush_returns_after_the_upload_failure_is_reported(pg, db, agent, tmp_path):
    """An upload that fails for good (a path segment over 255 bytes, which no local file
    system takes): flush() returns only once the failure is in the client's error stream.
    Ten clients in a row, each reading its errors right after its flush."""
    src = tmp_path / "f.txt"
    src.write_text("payload")
    long_dir = "d" * 300
    for attempt in range(10):
        out, _ = run_driver(agent.socket, [
            ["run", "r", "long-path-exp", f"a{attempt}", "now"],
            ["artifact", "r", str(src), long_dir],
            ["flush", "60000"],
            ["errors"],
        ])
        flushes = [f for f in out if f[0] == "flush"]
        errors = [f for f in out if f[0] == "error"]
        assert flushes == [["flush", "0"]], out
        assert len(errors) == 1 and errors[0][2] == "23", (attempt, out)
        assert "File name too long" in errors[0][3], errors
