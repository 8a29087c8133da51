"""Artifacts: files handed to the agent as descriptors, spooled, uploaded to the run's
artifact store and recorded in trackd_artifacts; MLflow lists and downloads them."""
import hashlib
import os

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
    """0 B, 1 KiB and 64 MiB files, each deleted by the caller right after the call: MLflow's
    list_artifacts and download_artifacts return identical bytes, and the ledger has each
    with its size and sha256."""
    src = tmp_path / "src"
    src.mkdir()
    files = {"empty.bin": 0, "small.txt": 1024, "big.bin": 64 << 20}
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
    assert inner == {"outputs/empty.bin": 0, "outputs/big.bin": 64 << 20}, inner
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
