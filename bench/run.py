"""The trackd bench: every contender, every workload, side by side in one run on this machine.

    ./trackd-dev bench [--scale 1.0] [--only W1,W2,PACED,W3,W4,SCALE,IMPORT] [--w4-rows 10000000]
    .venv/bin/python bench/run.py [same options]      (after ./trackd-dev build)

Workloads (at --scale 1; --scale multiplies steps and runs):
  W1  high-frequency scalars: 8 processes x 50 keys x 20,000 steps, one run each (8,000,000 points)
  W2  many runs: 2,000 runs x (20 params, 10 tags, 5 keys x 100 steps), over 8 processes
  W3  a 512 MiB artifact logged by another process while W1 runs through trackd, against W1
      alone with the same run ids
  W4  W1 through L and T-C again, into a database whose metrics table already holds
      --w4-rows rows (10,000,000) of 100 other runs: the cost as the table grows
  IMPORT  an MLflow file store of 1,000 runs x 1,000 points moved by `trackd import`, by
      `mlflow migrate-filestore` (into SQLite) and by an MlflowClient replay (bench/importing.py)
Contenders, on one PostgreSQL 15 (default settings, fsync on), each into a fresh copy of the
same MLflow schema:
  L     the limit: psql \\copy of the same rows into a staging table, then the statements
        trackd runs (INSERT ... ON CONFLICT into metrics, the latest_metrics upsert; for W2 also
        runs, params and tags), in one transaction
  T-C   trackd-loadgen through libtrackd (C); T-Py the trackd package; T-M mlflow's fluent API
        under MLFLOW_TRACKING_URI=trackd:
  M1    mlflow.log_metric & co. on postgresql://; M2 MlflowClient.log_batch, 1,000 per call;
  M3    MLflow async logging, default and with MLFLOW_ASYNC_LOGGING_BUFFERING_SECONDS=2
Slow contenders log fewer points (the table says how many) and are compared by rate.

Figures: points/s until durable (first call until the flush barrier returns and every row is
counted in PostgreSQL); per-call latency p50/p99/p99.9 in the training process; agent CPU
seconds per million points; agent peak RSS; log-to-visible latency (PACED: every process logs
500 points/s, the bench polls PostgreSQL every 10 ms for each step's first point); W3's effect
on W1; SCALE: W1 with 1, 4 and 16 agents on one PostgreSQL.

Writes bench/results/<date>-<host>.md and the plots <date>-<host>-throughput.png and
<date>-<host>-latency.png. Nothing here is pass/fail; the CI runs only `--smoke`.
"""
import argparse
import datetime
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "integration"))
sys.path.insert(0, str(ROOT / "bench"))
import importing  # noqa: E402
import report  # noqa: E402
from harness import BUILD, Agent, Postgres  # noqa: E402

PY = sys.executable
LOADGEN = BUILD / "trackd-loadgen"
PYWORKER = ROOT / "bench" / "pyworker.py"
TS0 = 1_700_000_000_000
PROCS = 8
PACED_RATE = 500  # points/s per process
M3_PACED_RATE = 10  # MLflow's async logging cannot keep up with more here (see the W1 table)
PACED_SECONDS = 20


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---- latency histograms (the buckets of trackd-loadgen) ------------------------------------

def bucket_low(i):
    if i < 128:
        return i
    e = 7 + (i - 128) // 64
    return (64 + (i - 128) % 64) << (e - 6)


class Hist:
    def __init__(self):
        self.c = {}

    def add(self, pairs):
        for i, n in pairs:
            self.c[i] = self.c.get(i, 0) + n
        return self

    @property
    def n(self):
        return sum(self.c.values())

    def pct(self, p):
        """The lower bound of the bucket holding the p-th percentile, in ns (1.6% resolution)."""
        total, acc = self.n, 0
        for i in sorted(self.c):
            acc += self.c[i]
            if acc >= p / 100 * total:
                return bucket_low(i)
        return float("nan")

    def cdf(self):
        total, acc, xs, ys = self.n, 0, [], []
        for i in sorted(self.c):
            acc += self.c[i]
            xs.append(max(bucket_low(i), 1))
            ys.append(acc / total)
        return xs, ys


def fmt_ns(ns):
    if ns != ns:
        return "–"
    if ns < 1000:
        return f"{ns:.0f} ns"
    if ns < 1e6:
        return f"{ns / 1e3:.1f} µs"
    if ns < 1e9:
        return f"{ns / 1e6:.1f} ms"
    return f"{ns / 1e9:.2f} s"


# ---- processes -------------------------------------------------------------------------------

class Proc:
    """An agent's CPU time and peak RSS, from /proc."""

    def __init__(self, pid):
        self.pid = pid

    def cpu_s(self):
        f = open(f"/proc/{self.pid}/stat").read().rsplit(")", 1)[1].split()
        return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")

    def peak_rss_kib(self):
        for line in open(f"/proc/{self.pid}/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
        return 0


def run_all(cmds, env, cwd):
    """Starts every command at once; returns their JSON outputs (each must exit 0). Python
    workers (--go) first import their libraries and say "ready", and all start logging together
    once every one has: importing MLflow takes seconds of CPU per process, which is not the
    logging path, and would otherwise fall inside the first worker's window."""
    ps = [subprocess.Popen(c, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           stdin=subprocess.PIPE if "--go" in c else subprocess.DEVNULL, text=True)
          for c in cmds]
    waiting = [p for c, p in zip(cmds, ps) if "--go" in c]
    for p in waiting:
        line = p.stdout.readline()
        if line.strip() != "ready":
            p.kill()
            raise RuntimeError(f"a worker did not get ready: {line!r} {p.stderr.read()[-3000:]}")
    for p in waiting:
        p.stdin.write("go\n")
        p.stdin.flush()  # communicate() closes it
    out, errs = [], []
    for c, p in zip(cmds, ps):
        so, se = p.communicate(timeout=7200)
        if p.returncode != 0:
            raise RuntimeError(f"{' '.join(map(str, c))} exited {p.returncode}:\n{se[-3000:]}\n{so[-500:]}")
        out.append(json.loads(so.strip().splitlines()[-1]))
        errs += [line for line in se.splitlines() if "Error" in line or "Exception" in line][-3:]
    return out, errs


class Poller(threading.Thread):
    """Polls which step of key m0 each run has in PostgreSQL, every 10 ms, and records when each
    step first became visible; also the largest number of connections to the database."""

    def __init__(self, pg, db, steps=True):
        super().__init__(daemon=True)
        self.pg, self.db, self.steps = pg, db, steps
        self.seen = {}  # run -> list of (monotonic, max step)
        self.max_conns = 0
        self.halt = threading.Event()

    def run(self):
        with self.pg.connect(self.db) as c:
            while True:
                # One last poll after stop(): the processes' flush barriers have returned, so
                # it sees every step.
                final = self.halt.is_set()
                rows = c.execute("SELECT run_uuid, max(step) FROM metrics WHERE key = 'm0'"
                                 " GROUP BY run_uuid").fetchall() if self.steps else []
                t = time.monotonic()
                for run, step in rows:
                    hist = self.seen.setdefault(run, [])
                    if not hist or hist[-1][1] != step:
                        hist.append((t, step))
                n = c.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s"
                              " AND pid <> pg_backend_pid()", (self.db,)).fetchone()[0]
                self.max_conns = max(self.max_conns, n)
                if final:
                    break
                self.halt.wait(0.01)

    def stop(self):
        self.halt.set()
        self.join()

    def visible_latencies(self, results):
        """Seconds from logging each step's first point to its poll showing it."""
        lat = []
        for r in results:
            seen = self.seen.get(r["run_id"], [])
            j = 0
            for step, t_logged in r["probe"]:
                while j < len(seen) and seen[j][1] < step:
                    j += 1
                if j == len(seen):
                    raise RuntimeError(f"step {step} of run {r['run_id']} never became visible")
                lat.append(seen[j][0] - t_logged)
        return sorted(lat)


def quantile(sorted_xs, p):
    return sorted_xs[min(len(sorted_xs) - 1, int(p / 100 * len(sorted_xs)))] if sorted_xs else float("nan")


# ---- the bench -------------------------------------------------------------------------------

class Bench:
    def __init__(self, args):
        self.args = args
        self.work = Path(tempfile.mkdtemp(prefix="trackd-bench-"))
        os.chmod(self.work, 0o755)
        self.pg = Postgres().start(durable=True)
        self.ndb = 0
        self.rows = []      # W1 and W2 table rows (dicts)
        self.paced = []     # paced rows
        self.scale_rows = []
        self.w3 = None
        self.imports = None  # IMPORT's result (importing.py)
        self.w4 = []        # W4 rows: W1 into a full metrics table
        self.prefill = 0    # rows W4 puts into every new database's metrics first
        self.baseline = {}  # db -> {table: rows the prefill left}
        self.failures = []  # (part, first line of the error)
        self.base_env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "TRACKD_"))}
        self.base_env["PYTHONPATH"] = str(ROOT / "bench")

    def close(self):
        self.pg.stop()

    def db(self, tag):
        self.ndb += 1
        db = self.pg.mlflow_db(f"b{self.ndb}_{tag.lower().replace('-', '_')}")
        if self.prefill:
            self.fill(db, self.prefill)
        return db

    def fill(self, db, n):
        """W4: n metric rows of 100 runs that are not the workload's (50 keys each, steps in
        order), their latest_metrics, then VACUUM ANALYZE and a checkpoint, so the workload
        meets a large, settled table and index."""
        log(f"W4: filling {db} with {n:,} metric rows ...")
        per_run = max(1, n // 100)
        secs = self.psql(db, FILL_W4.format(per_run=per_run, ts0=TS0 - 10**9))
        secs += self.psql(db, "VACUUM ANALYZE metrics;\nCHECKPOINT;\n")
        self.baseline[db] = {t: self.pg.query(db, f"SELECT count(*) FROM {t}")[0][0]
                             for t in ("metrics", "latest_metrics", "runs")}
        log(f"  {self.baseline[db]['metrics']:,} rows in {secs:.0f} s")

    def agent(self, db, name):
        a = Agent(self.pg, db, self.work / name, artifact_root=str(self.work / "mlruns"), log_level="info")
        a.config.write_text(a.config.read_text().replace(
            "[mlflow]\n", f'[mlflow]\nbackend_uri = "{self.pg.url(db)}"\n'))
        return a.start()

    def count(self, db, table):
        """Rows in table, less those W4's prefill put there."""
        n = self.pg.query(db, f"SELECT count(*) FROM {table}")[0][0]
        return n - self.baseline.get(db, {}).get(table, 0)

    # -- shapes ---------------------------------------------------------------------------------
    def w1_steps(self, contender):
        full = max(1, int(20000 * self.args.scale))
        slow = {"M1": 20, "M2": 1000, "M3": 20, "M3-buf": 20}
        return min(full, max(1, int(slow.get(contender, full) * max(self.args.scale, 0.01)))) \
            if contender in slow else full

    def w2_runs(self, contender):
        full = max(PROCS, int(2000 * self.args.scale))
        slow = {"M1": 16, "M2": 80, "M3": 8, "M3-buf": 8, "T-M": 80}
        n = slow.get(contender, full)
        return max(PROCS, (min(full, n) // PROCS) * PROCS)

    # -- contenders -----------------------------------------------------------------------------
    def commands(self, contender, mode, n_procs, sock_of, steps=None, runs_per_proc=None, rate=0,
                 run_ids=None):
        """The processes' command lines; run_ids (T-C, W1): the run id of each process."""
        cmds = []
        for i in range(n_procs):
            if mode == "w1":
                shape = ["--keys", "50", "--steps", str(steps)]
            else:
                shape = ["--runs", str(runs_per_proc), "--params", "20", "--tags", "10",
                         "--keys", "5", "--steps", "100"]
            if rate:
                shape += ["--rate", str(rate)]
            name = ["--name", f"{contender}-{i}"]
            if contender == "T-C":
                cmds.append([str(LOADGEN), mode, *shape, *name, "--socket", sock_of(i)]
                            + ([] if rate else ["--block"])
                            + (["--run-id", run_ids[i]] if run_ids else []))
            else:
                cmds.append([PY, str(PYWORKER), contender.replace("-buf", ""), mode, *shape, *name,
                             "--go"])
        return cmds

    def env_for(self, contender, db, agent_socket, block):
        env = dict(self.base_env)
        if contender in ("T-C", "T-Py", "T-M"):
            env["TRACKD_SOCKET"] = agent_socket
            env["MLFLOW_TRACKING_URI"] = f"trackd://{agent_socket}"
            if block:
                env["TRACKD_OVERFLOW"] = "block"
                env["TRACKD_BLOCK_TIMEOUT_MS"] = str(3600 * 1000)
        else:
            env["MLFLOW_TRACKING_URI"] = self.pg.url(db)
        if contender.startswith("M3"):
            env["MLFLOW_ENABLE_ASYNC_LOGGING"] = "true"
        if contender == "M3-buf":
            env["MLFLOW_ASYNC_LOGGING_BUFFERING_SECONDS"] = "2"
        return env

    def run_contender(self, contender, mode, rate=0, n_agents=1, poll=None, extra=None,
                      same_total=False, run_ids=None):
        """Runs one contender on one workload; returns a result dict with the checked counts."""
        db = self.db(f"{mode}_{contender}")
        agents = []
        trackd = contender in ("T-C", "T-Py", "T-M")
        if trackd:
            agents = [self.agent(db, f"agent-{db}-{i}") for i in range(n_agents)]
        n_procs = max(PROCS, n_agents)
        steps = runs_per_proc = None
        if mode == "w1":
            steps = max(1, int(PACED_SECONDS * rate / 50)) if rate else self.w1_steps(contender)
            if same_total:  # W1's points, spread over more processes
                steps = max(1, steps * PROCS // n_procs)
        else:
            runs_per_proc = self.w2_runs(contender) // PROCS
        env = self.env_for(contender, db, agents[0].socket if agents else None, block=not rate)
        cmds = self.commands(contender, mode, n_procs, lambda i: agents[i % n_agents].socket,
                             steps, runs_per_proc, rate, run_ids)
        if contender != "T-C" and n_agents > 1:
            raise ValueError("several agents only for T-C")
        procs = [Proc(a.proc.pid) for a in agents]
        cpu0 = [p.cpu_s() for p in procs]
        poller = Poller(self.pg, db, steps=poll == "steps") if poll else None
        if poller:
            poller.start()
        side = extra(agents) if extra else None
        t_wall = time.monotonic()
        started_ms = int(time.time() * 1000) - 1000  # runs this contender starts (not W4's prefill)
        log(f"{mode.upper()} {contender}: {len(cmds)} processes"
            + (f", {steps:,} steps x 50 keys each" if steps else f", {runs_per_proc} runs each")
            + (f", paced at {rate} points/s each" if rate else "")
            + (f", {n_agents} agents" if n_agents > 1 else ""))
        results, self.stderr_tail = run_all(cmds, env, self.work)
        elapsed_wall = time.monotonic() - t_wall
        if poller:
            poller.stop()
        side_out = side() if side else None
        res = {"contender": contender, "mode": mode, "procs": len(cmds), "rate": rate,
               "agents": n_agents, "db": db, "side": side_out}
        res["points"] = sum(r["points"] for r in results)
        res["run_ids"] = [r.get("run_id") for r in results]
        res["events"] = sum(r["events"] for r in results)
        res["dropped"] = sum(r["dropped"] for r in results)
        res["seconds"] = max(r["t_durable"] for r in results) - min(r["t0"] for r in results)
        res["hist"] = Hist()
        res["hist_first"] = Hist()
        res["hist_steady"] = Hist()
        for r in results:
            res["hist"].add(r["hist"]).add(r["hist_first"])
            res["hist_first"].add(r["hist_first"])
            res["hist_steady"].add(r["hist"])
        res["timer_ns"] = max(r["timer_ns"] for r in results)
        if procs:
            res["cpu_s"] = sum(p.cpu_s() - c for p, c in zip(procs, cpu0))
            res["rss_mib"] = max(p.peak_rss_kib() for p in procs) / 1024
        if poller:
            res["visible"] = poller.visible_latencies(results) if poll == "steps" else []
            res["max_conns"] = poller.max_conns
        for a in agents:
            st = a.stats()
            res.setdefault("stats", []).append(st)
            if mode == "w1" and n_agents == 1 and st.get("db_connections", 0) > 1:
                # A run goes through one writer connection at a time, the one with the fewest
                # runs: the busiest connection bounds what they do in parallel.
                res["busiest"] = st["runs_on_busiest_writer_peak"]
                res["connections"] = st["db_connections"]
                log(f"{contender} {mode}: at most {res['busiest']} of {PROCS} runs on one of "
                    f"{res['connections']} writer connections")
            log(f"{contender} {mode}: the agent committed {st['batches_committed']:,} transactions,"
                f" {st['ranges_direct']:,} of them tried straight into metrics,"
                f" {st['direct_fallbacks']:,} fell back to the staging table")
            rc = a.stop(timeout=120)
            if rc != 0:
                raise RuntimeError(f"agent exited {rc}:\n{a.log()[-3000:]}")
        # Every contender's rows are counted: a figure only counts what landed.
        landed = self.count(db, "metrics")
        res["lost"] = res["points"] - landed
        if landed != res["points"]:
            if trackd:
                raise RuntimeError(f"{contender} {mode}: {landed} metric rows, expected {res['points']}")
            # MLflow's own paths are measured as they are: rates count only rows that landed.
            log(f"  {contender} logged {res['points']:,} points but {landed:,} landed; "
                f"its processes' errors: {self.stderr_tail[-3:]}")
            res["points"] = landed
            res["errors_tail"] = self.stderr_tail
        if mode == "w2":
            n_runs = self.count(db, "runs")
            want_runs = runs_per_proc * len(cmds)
            n_params = self.count(db, "params")
            if (n_runs != want_runs or n_params != want_runs * 20) and trackd:
                raise RuntimeError(f"{contender} w2: {n_runs} runs, {n_params} params; expected "
                                   f"{want_runs} and {want_runs * 20}")
            res["lost_params"] = want_runs * 20 - n_params
            res["runs"] = n_runs
        log(f"  {res['points']:,} points in {res['seconds']:.2f} s = "
            f"{res['points'] / res['seconds']:,.0f} points/s; p50 {fmt_ns(res['hist'].pct(50))}"
            f" (wall {elapsed_wall:.1f} s)")
        return res

    # -- L: the same rows through psql ----------------------------------------------------------
    def psql(self, db, script):
        t = time.monotonic()
        subprocess.run(["psql", "-h", str(self.pg.dir), "-U", "postgres", "-d", db, "-X", "-q",
                        "-v", "ON_ERROR_STOP=1"], input=script, text=True, check=True,
                       capture_output=True)
        return time.monotonic() - t

    def make_runs(self, db, ids):
        exp = self.pg.query(db, "SELECT experiment_id FROM experiments WHERE experiment_id = 0")[0][0]
        with self.pg.connect(db) as c:
            with c.cursor() as cur:
                cur.executemany(
                    "INSERT INTO runs (run_uuid, name, source_type, source_name, entry_point_name,"
                    " user_id, status, start_time, source_version, lifecycle_stage, artifact_uri,"
                    " experiment_id) VALUES (%s, %s, 'UNKNOWN', '', '', 'bench', 'RUNNING', 0, '',"
                    " 'active', '', %s)", [(i, i, exp) for i in ids])

    def run_limit_w1(self):
        db = self.db("w1_L")
        steps = self.w1_steps("L")
        ids = [f"{i:032x}" for i in range(1, PROCS + 1)]
        self.make_runs(db, ids)
        rows = self.work / "w1.tsv"
        log(f"W1 L: writing {PROCS * 50 * steps:,} rows for psql ...")
        with open(rows, "w") as f:
            for rid in ids:
                for s in range(steps):
                    ts = TS0 + s
                    f.write("".join(f"m{k}\t{(s * 50 + k) * 0.5!r}\t{ts}\t{rid}\t{s}\tf\n" for k in range(50)))
        log("W1 L: psql \\copy into staging + trackd's statements ...")
        secs = self.psql(db, STAGE_W1.format(path=rows, metrics=STAGE_METRICS))
        rows.unlink()
        n = PROCS * 50 * steps
        if self.count(db, "metrics") != n or self.count(db, "latest_metrics") != PROCS * 50:
            raise RuntimeError("L W1: rows missing")
        log(f"  {n:,} points in {secs:.2f} s = {n / secs:,.0f} points/s")
        return {"contender": "L", "mode": "w1", "points": n, "events": n, "seconds": secs,
                "procs": 1, "dropped": 0}

    def run_direct_w1(self, contender, n_conns):
        """L-direct (n_conns 1) and P (2): W1's rows COPYed straight into metrics, no staging
        table, and latest_metrics from the winners per (run, key) computed here, as an agent
        that knows its batch cannot conflict could; P splits the runs over parallel psql
        connections. The ceiling a direct write path could reach on this machine."""
        db = self.db(f"w1_{contender}")
        steps = self.w1_steps("L")
        ids = [f"{i:032x}" for i in range(1, PROCS + 1)]
        self.make_runs(db, ids)
        parts = [ids[k::n_conns] for k in range(n_conns)]
        scripts = []
        log(f"W1 {contender}: writing {PROCS * 50 * steps:,} rows for {n_conns} psql ...")
        for k, part in enumerate(parts):
            rows, latest = self.work / f"w1-direct-{k}.tsv", self.work / f"w1-latest-{k}.tsv"
            with open(rows, "w") as f, open(latest, "w") as g:
                for rid in part:
                    for s in range(steps):
                        f.write("".join(f"m{k}\t{(s * 50 + k) * 0.5!r}\t{TS0 + s}\t{rid}\t{s}\tf\n"
                                        for k in range(50)))
                    s = steps - 1
                    g.write("".join(f"m{k}\t{(s * 50 + k) * 0.5!r}\t{TS0 + s}\t{rid}\t{s}\tf\n"
                                    for k in range(50)))
            scripts.append(DIRECT_W1.format(path=rows, latest=latest))
        log(f"W1 {contender}: psql \\copy straight into metrics, {n_conns} connection(s) ...")
        t = time.monotonic()
        threads = [threading.Thread(target=self.psql, args=(db, sc)) for sc in scripts]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        secs = time.monotonic() - t
        for k in range(n_conns):
            (self.work / f"w1-direct-{k}.tsv").unlink()
            (self.work / f"w1-latest-{k}.tsv").unlink()
        n = PROCS * 50 * steps
        if self.count(db, "metrics") != n or self.count(db, "latest_metrics") != PROCS * 50:
            raise RuntimeError(f"{contender} W1: rows missing")
        log(f"  {n:,} points in {secs:.2f} s = {n / secs:,.0f} points/s")
        return {"contender": contender, "mode": "w1", "points": n, "events": n, "seconds": secs,
                "procs": n_conns, "dropped": 0}

    def run_limit_w2(self):
        db = self.db("w2_L")
        nruns = self.w2_runs("L")
        exp = self.pg.query(db, "SELECT experiment_id FROM experiments WHERE experiment_id = 0")[0][0]
        f = {k: open(self.work / f"w2-{k}.tsv", "w") for k in ("runs", "params", "tags", "metrics")}
        for r in range(nruns):
            rid = f"{r + 1:032x}"
            f["runs"].write(f"{rid}\tL-{r}\t{TS0}\t{exp}\n")
            for k in range(20):
                f["params"].write(f"p{k}\t{r * 1000 + k}\t{rid}\n")
            for k in range(10):
                f["tags"].write(f"t{k}\tvalue\t{rid}\n")
            for s in range(100):
                f["metrics"].write("".join(f"m{k}\t{(s * 5 + k) * 0.5!r}\t{TS0 + s}\t{rid}\t{s}\tf\n"
                                           for k in range(5)))
        for x in f.values():
            x.close()
        log(f"W2 L: {nruns:,} runs through psql \\copy + trackd's statements ...")
        secs = self.psql(db, STAGE_W2.format(dir=self.work, metrics=STAGE_METRICS))
        for k in f:
            (self.work / f"w2-{k}.tsv").unlink()
        if self.count(db, "runs") != nruns or self.count(db, "metrics") != nruns * 500:
            raise RuntimeError("L W2: rows missing")
        events = nruns * (2 + 20 + 10 + 500)
        log(f"  {events:,} events in {secs:.2f} s")
        return {"contender": "L", "mode": "w2", "points": nruns * 500, "events": events,
                "seconds": secs, "procs": 1, "dropped": 0, "runs": nruns}

    # -- W3 -------------------------------------------------------------------------------------
    def artifact_side(self, mib):
        """W3's side: the agent's counters sampled every 0.1 s from W1's start and, with mib, a
        mib MiB artifact logged through the same agent by another process from W1's start on."""
        path = self.work / "artifact.bin"
        if mib:
            with open(path, "wb") as f:
                for _ in range(mib):
                    f.write(os.urandom(1 << 20))
                f.flush()
                os.fsync(f.fileno())  # its writeback is the bench's, not part of the measurement

        def start(agents):
            a = agents[0]
            samples = []
            halt = threading.Event()

            def sample():
                while not halt.is_set():
                    s = a.stats()
                    samples.append((time.monotonic(), s["metrics_committed"], s["artifacts_uploaded"]))
                    halt.wait(0.1)
            t_call = time.monotonic()
            p = subprocess.Popen([str(LOADGEN), "artifact", str(path), "--socket", a.socket,
                                  "--name", "w3-artifact"], stdout=subprocess.PIPE,
                                 text=True) if mib else None
            th = threading.Thread(target=sample, daemon=True)
            th.start()

            def finish():
                out = json.loads(p.communicate(timeout=3600)[0]) if p else None
                halt.set()
                th.join()
                st = a.stats()  # the artifact's flush returned: it is uploaded
                samples.append((time.monotonic(), st["metrics_committed"], st["artifacts_uploaded"]))
                up = next((t for t, _, n in samples if n >= 1), None)
                return {"t_call": t_call, "t_uploaded": up, "samples": samples, "artifact": out}
            return finish
        return start

    def run_w3(self):
        """Pairs of T-C W1 runs with the same run ids: alone, then while the artifact uploads,
        both sampled from their start. One W1 run differs from the next by several percent, so
        the pairs are repeated and the median pair ratio is the figure."""
        pairs = []
        for _ in range(self.args.w3_pairs):
            alone = self.run_contender("T-C", "w1", extra=self.artifact_side(0),
                                       run_ids=pairs[0]["alone"]["run_ids"] if pairs else None)
            res = self.run_contender("T-C", "w1", extra=self.artifact_side(self.args.artifact_mib),
                                     run_ids=alone["run_ids"])
            (self.work / "artifact.bin").unlink()
            side = res["side"]
            if side["t_uploaded"] is None:
                raise RuntimeError("W3: the artifact was not uploaded during W1")
            upload_s = side["t_uploaded"] - side["t_call"]
            # The same window from each run's start: as long as the upload, within both runs.
            window = min(upload_s, alone["seconds"], res["seconds"])

            def committed_rate(sd):
                t0, smp = sd["t_call"], sd["samples"]
                inside = [x for x in smp if x[0] <= t0 + window]  # the agent counts from 0
                return inside[-1][1] / (inside[-1][0] - t0) if inside and inside[-1][0] > t0 \
                    else float("nan")
            pair = {"alone": alone, "with": res, "window_s": window, "upload_s": upload_s,
                    "rate_alone": committed_rate(alone["side"]), "rate_during": committed_rate(side)}
            pair["ratio"] = ratio(pair["rate_during"], pair["rate_alone"])
            pair["ratio_whole"] = ratio(rate(res), rate(alone))
            log(f"W3 pair {len(pairs) + 1}: first {window:.1f} s {pair['ratio']:.2f} x alone, "
                f"whole runs {pair['ratio_whole']:.2f}")
            pairs.append(pair)
        self.w3 = {"pairs": pairs, "ratio": statistics.median(p["ratio"] for p in pairs),
                   "ratio_whole": statistics.median(p["ratio_whole"] for p in pairs)}


# trackd's metric statements (batch.c), on a staging table "stage" that psql \\copy filled:
# only runs that are active are written to (trackd passes the batch's runs as an array).
STAGE_METRICS = """
SELECT array_agg(DISTINCT run_uuid) AS runs FROM stage \\gset
INSERT INTO metrics (key, value, "timestamp", run_uuid, step, is_nan)
  SELECT key, value, "timestamp", run_uuid, step, is_nan FROM stage
  WHERE run_uuid IN (SELECT run_uuid FROM runs WHERE run_uuid = ANY(:'runs'::text[])
                     AND lifecycle_stage = 'active')
  ON CONFLICT DO NOTHING;
INSERT INTO latest_metrics (key, value, "timestamp", step, is_nan, run_uuid)
  SELECT key, value, "timestamp", step, is_nan, run_uuid FROM (
    SELECT DISTINCT ON (run_uuid, key) * FROM stage
    WHERE run_uuid IN (SELECT run_uuid FROM runs WHERE run_uuid = ANY(:'runs'::text[])
                       AND lifecycle_stage = 'active')
    ORDER BY run_uuid, key, step DESC, "timestamp" DESC, value DESC) s
  ORDER BY run_uuid, key
  ON CONFLICT (key, run_uuid) DO UPDATE SET value = EXCLUDED.value, "timestamp" = EXCLUDED."timestamp",
    step = EXCLUDED.step, is_nan = EXCLUDED.is_nan
  WHERE (EXCLUDED.step, EXCLUDED."timestamp", EXCLUDED.value)
      > (latest_metrics.step, latest_metrics."timestamp", latest_metrics.value);
"""

STAGE_W1 = """
BEGIN;
CREATE TEMP TABLE stage (key text, value float8, "timestamp" int8, run_uuid text, step int8,
                         is_nan bool) ON COMMIT DROP;
\\copy stage FROM '{path}'
{metrics}COMMIT;
"""

# W4's prefill: 100 runs of {per_run} points each (50 keys, one step per 50 points).
FILL_W4 = """
INSERT INTO runs (run_uuid, name, source_type, source_name, entry_point_name, user_id, status,
                  start_time, source_version, lifecycle_stage, artifact_uri, experiment_id)
  SELECT 'f' || lpad(r::text, 31, '0'), 'fill-' || r, 'UNKNOWN', '', '', 'bench', 'FINISHED', 0,
         '', 'active', '', 0 FROM generate_series(1, 100) r;
INSERT INTO metrics (key, value, "timestamp", run_uuid, step, is_nan)
  SELECT 'm' || (g % 50), g * 0.25, {ts0} + g / 50, 'f' || lpad(r::text, 31, '0'), g / 50, false
  FROM generate_series(1, 100) r, generate_series(0, {per_run} - 1) g;
INSERT INTO latest_metrics (key, value, "timestamp", step, is_nan, run_uuid)
  SELECT DISTINCT ON (run_uuid, key) key, value, "timestamp", step, is_nan, run_uuid FROM metrics
  ORDER BY run_uuid, key, step DESC, "timestamp" DESC, value DESC;
"""

# L-direct and P: COPY straight into metrics, then the winners the writer would compute.
DIRECT_W1 = """
BEGIN;
\\copy metrics (key, value, "timestamp", run_uuid, step, is_nan) FROM '{path}'
CREATE TEMP TABLE win (key text, value float8, "timestamp" int8, run_uuid text, step int8,
                       is_nan bool) ON COMMIT DROP;
\\copy win FROM '{latest}'
INSERT INTO latest_metrics (key, value, "timestamp", step, is_nan, run_uuid)
  SELECT key, value, "timestamp", step, is_nan, run_uuid FROM win ORDER BY run_uuid, key
  ON CONFLICT (key, run_uuid) DO UPDATE SET value = EXCLUDED.value, "timestamp" = EXCLUDED."timestamp",
    step = EXCLUDED.step, is_nan = EXCLUDED.is_nan
  WHERE (EXCLUDED.step, EXCLUDED."timestamp", EXCLUDED.value)
      > (latest_metrics.step, latest_metrics."timestamp", latest_metrics.value);
COMMIT;
"""

STAGE_W2 = """
BEGIN;
CREATE TEMP TABLE s_runs (id text, name text, st int8, exp int4) ON COMMIT DROP;
CREATE TEMP TABLE s_params (key text, value text, run_uuid text) ON COMMIT DROP;
CREATE TEMP TABLE s_tags (key text, value text, run_uuid text) ON COMMIT DROP;
CREATE TEMP TABLE stage (key text, value float8, "timestamp" int8, run_uuid text, step int8,
                         is_nan bool) ON COMMIT DROP;
\\copy s_runs FROM '{dir}/w2-runs.tsv'
\\copy s_params FROM '{dir}/w2-params.tsv'
\\copy s_tags FROM '{dir}/w2-tags.tsv'
\\copy stage FROM '{dir}/w2-metrics.tsv'
INSERT INTO runs (run_uuid, name, source_type, source_name, entry_point_name, user_id, status,
                  start_time, end_time, source_version, lifecycle_stage, artifact_uri,
                  experiment_id, deleted_time)
  SELECT r.id, r.name, 'UNKNOWN', '', '', 'bench', 'RUNNING', r.st, NULL, '', 'active',
         e.artifact_location || '/' || r.id || '/artifacts', e.experiment_id, NULL
  FROM s_runs r JOIN experiments e ON e.experiment_id = r.exp
  ON CONFLICT (run_uuid) DO NOTHING;
INSERT INTO params (key, value, run_uuid) SELECT key, value, run_uuid FROM s_params
  ORDER BY run_uuid, key ON CONFLICT (key, run_uuid) DO NOTHING;
INSERT INTO tags (key, value, run_uuid) SELECT key, value, run_uuid FROM s_tags ORDER BY 3, 1
  ON CONFLICT (key, run_uuid) DO UPDATE SET value = EXCLUDED.value;
{metrics}UPDATE runs SET status = 'FINISHED', end_time = start_time FROM s_runs WHERE runs.run_uuid = s_runs.id;
COMMIT;
"""


# ---- the report ------------------------------------------------------------------------------

W1_ORDER = ["L", "L-direct", "P", "T-C", "T-Py", "T-M", "M1", "M2", "M3", "M3-buf"]
W2_ORDER = ["L", "T-C", "T-Py", "T-M", "M1", "M2", "M3"]
WHAT = {"L": "psql \\copy + trackd's statements",
        "L-direct": "psql \\copy straight into metrics", "P": "L-direct, 2 connections",
        "T-C": "libtrackd (C) -> agent",
        "T-Py": "trackd package -> agent", "T-M": "mlflow fluent API, trackd: URI",
        "M1": "mlflow.log_metric, postgresql://", "M2": "MlflowClient.log_batch x 1000",
        "M3": "MLflow async logging", "M3-buf": "async, BUFFERING_SECONDS=2"}


def rate(r, what="points"):
    return r[what] / r["seconds"]


def ratio(a, b):
    """a / b, or NaN when b is 0 (a run too short to measure, as in --smoke)."""
    return a / b if b else float("nan")


def versions():
    import mlflow
    pgv = subprocess.run(["psql", "--version"], capture_output=True, text=True).stdout.strip()
    agent = subprocess.run([str(BUILD / "trackd"), "--version"], capture_output=True, text=True).stdout.strip()
    return f"Versions: {agent}; MLflow {mlflow.__version__}; {pgv}."


def table(rows, order, what, limit):
    by = {r["contender"]: r for r in rows}
    out = ["| contender | what | processes | " + what + " | per second | vs L | per-call p50 | p99 | "
           "p99.9 | agent CPU s per M points | agent peak RSS | lost |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in order:
        r = by.get(c)
        if not r:
            continue
        n = r["points"] if what == "points" else r["events"]
        h = r.get("hist")
        cpu = (f"{r['cpu_s'] / (r['points'] / 1e6):.2f}" if r.get("cpu_s") is not None and r["points"] else "–")
        rss = f"{r['rss_mib']:.1f} MiB" if r.get("rss_mib") else "–"
        vs = f"{rate(r, what) / rate(limit, what):.2f}" if limit else "–"
        out.append(f"| {c} | {WHAT[c]} | {r['procs']} | {n:,} | {rate(r, what):,.0f} | {vs} | "
                   + (f"{fmt_ns(h.pct(50))} | {fmt_ns(h.pct(99))} | {fmt_ns(h.pct(99.9))}" if h else "– | – | –")
                   + f" | {cpu} | {rss} | {r.get('lost', 0):,} |")
    return out


ONLY_ALL = "W1,W2,PACED,W3,W4,SCALE,IMPORT"
W4_ROWS = 10_000_000


def write_report(b, args, started):
    host = socket.gethostname()
    today = datetime.date.today()
    opts = f"--scale {args.scale:g}" + (f" --only {args.only}" if args.only != ONLY_ALL else "") \
        + (f" --contenders {args.contenders}" if args.contenders else "") \
        + (f" --w4-rows {args.w4_rows}" if args.w4_rows != W4_ROWS else "")
    L = [f"# trackd bench, {today} on {host}", "", report.machine(), versions(),
         f"Command: `./trackd-dev bench {opts}` (started {started}, "
         f"took {(time.monotonic() - b.t_start) / 60:.0f} min).", ""]
    w1 = [r for r in b.rows if r["mode"] == "w1"]
    w2 = [r for r in b.rows if r["mode"] == "w2"]
    lim1 = next((r for r in w1 if r["contender"] == "L"), None)
    lim2 = next((r for r in w2 if r["contender"] == "L"), None)
    if w1:
        L += ["## W1: high-frequency scalars", "",
              f"{PROCS} processes x 50 keys, one run each; points/s from the first call until the last "
              "process's flush barrier returned, every row then counted in `metrics`. trackd "
              "contenders use the blocking overflow policy so that no point is dropped; their "
              "per-call latencies here include waiting for buffer space (see PACED for the cost "
              "of a call in a loop PostgreSQL keeps up with).", ""]
        L += table(w1, W1_ORDER, "points", lim1) + [""]
        busiest = [f"{r['contender']} {r['busiest']}" for r in w1 if r.get("busiest")]
        if busiest:
            L += [f"The most of the {PROCS} runs one writer connection held at once (a run goes to "
                  "the connection with the fewest; the busiest bounds the parallel gain): "
                  + ", ".join(busiest) + ".", ""]
    if w2:
        L += ["## W2: many runs", "",
              f"Runs x (start, 20 params, 10 tags, 5 keys x 100 steps, end) over {PROCS} processes; "
              "events = runs x 532. Every run, param and metric row counted.", ""]
        L += table(w2, W2_ORDER, "events", lim2) + [""]
    if b.paced:
        L += ["## PACED: per-call cost and log-to-visible latency", "",
              f"{PROCS} processes each log {PACED_RATE} points/s (10 steps/s x 50 keys; M3 "
              f"{M3_PACED_RATE} points/s, which it can keep up with) for "
              f"{PACED_SECONDS} s at default settings (trackd: drop-newest policy, 16 MiB buffer). "
              "Log-to-visible: from the call logging a step's first point until a poll of `metrics` "
              "(every 10 ms) shows it. The first call after each sleep between steps is also "
              "shown on its own: it runs on cold caches.", "",
              "| contender | points/s per process | calls | p50 | p99 | p99.9 | first call after a sleep: p50 / p99 | "
              "log-to-visible p50 | p99 | max | clock pair cost |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in b.paced:
            h, f, v = r["hist"], r["hist_first"], r.get("visible", [])
            L.append(f"| {r['contender']} | {r['rate']} | {h.n:,} | {fmt_ns(h.pct(50))} | {fmt_ns(h.pct(99))} | "
                     f"{fmt_ns(h.pct(99.9))} | {fmt_ns(f.pct(50))} / {fmt_ns(f.pct(99))} | "
                     f"{quantile(v, 50) * 1e3:.0f} ms | {quantile(v, 99) * 1e3:.0f} ms | "
                     f"{(v[-1] if v else float('nan')) * 1e3:.0f} ms | "
                     f"{r['timer_ns'] if r['contender'] == 'T-C' else '–'} ns |")
        L += ["", "M1 and M2 are synchronous: a point is visible when its call returns, so their "
              "log-to-visible latency is their per-call latency in W1.", ""]
    if b.w3:
        w = b.w3
        L += [f"## W3: a {args.artifact_mib} MiB artifact during W1", "",
              f"{len(w['pairs'])} pairs of T-C W1 runs with the same run ids: alone, then while "
              f"another process logs a {args.artifact_mib} MiB artifact through the same agent "
              "from the start (spool copy with fsync, then a copy into the local artifact store). "
              "Per pair: the points committed in the same first seconds of both runs (as long as "
              "the upload took, within both runs; agent counters every 0.1 s), and the whole "
              "runs. One W1 run differs from the next by several percent, hence the pairs and "
              "the median.", "",
              "| pair | window | upload took | alone, points/s | with the upload | vs alone | "
              "whole runs: alone | with the upload | vs alone |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for i, p in enumerate(w["pairs"], 1):
            L.append(f"| {i} | {p['window_s']:.1f} s | {p['upload_s']:.1f} s | "
                     f"{p['rate_alone']:,.0f} | {p['rate_during']:,.0f} | {p['ratio']:.2f} | "
                     f"{rate(p['alone']):,.0f} | {rate(p['with']):,.0f} | {p['ratio_whole']:.2f} |")
        L += [f"| median | | | | | {w['ratio']:.2f} | | | {w['ratio_whole']:.2f} |", ""]
    if b.w4:
        empty = {r["contender"]: r for r in w1}
        L += ["## W4: W1 into a metrics table that already holds rows", "",
              f"The same W1 (L and T-C), each into a database whose `metrics` already held "
              f"{args.w4_rows:,} rows of 100 other runs (index built, VACUUM ANALYZE, checkpoint).", "",
              "| contender | points | points/s, full table | vs L, full table | points/s, empty table (W1) | full / empty |",
              "|---|---:|---:|---:|---:|---:|"]
        lim4 = next((r for r in b.w4 if r["contender"] == "L"), None)
        for r in b.w4:
            e = empty.get(r["contender"])
            L.append(f"| {r['contender']} | {r['points']:,} | {rate(r):,.0f} | "
                     + (f"{rate(r) / rate(lim4):.2f}" if lim4 else "–") + " | "
                     + (f"{rate(e):,.0f} | {rate(r) / rate(e):.2f} |" if e else "– | – |"))
        L.append("")
    if b.scale_rows:
        L += ["## SCALE: W1 with several agents on one PostgreSQL", "",
              "Each agent has its own socket and journal; processes are spread over the agents "
              "(at least 8, one per agent with 16). Connections: the most seen in "
              "`pg_stat_activity` for the database during the run.", "",
              "| agents | processes | points | seconds | aggregate points/s | database connections |",
              "|---:|---:|---:|---:|---:|---:|"]
        for r in b.scale_rows:
            L.append(f"| {r['agents']} | {r['procs']} | {r['points']:,} | {r['seconds']:.2f} | "
                     f"{rate(r):,.0f} | {r['max_conns']} |")
        L.append("")
    if b.imports:
        L += importing.section(b.imports)
    L += targets(b)
    if b.failures:
        L += ["## Parts that failed", ""] + [f"- {w}: {e}" for w, e in b.failures] + [""]
    text = "\n".join(L) + "\n"
    # A run of IMPORT alone gets its own file, beside the day's full run rather than over it.
    only_import = {p.strip().upper() for p in args.only.split(",")} == {"IMPORT"}
    path = report.write(args.out, "import" if only_import else None, text)
    if b.rows or b.paced:
        plots(b, args.out, path.with_suffix(""))
    return path


def targets(b):
    by = {(r["contender"], r["mode"]): r for r in b.rows}
    paced = {r["contender"]: r for r in b.paced}
    out = ["## Targets", "", "| target | measured | met |", "|---|---|---|"]

    def row(name, value, ok):
        out.append(f"| {name} | {value} | {'yes' if ok else '**no**'} |")
    tc, L1, m1 = by.get(("T-C", "w1")), by.get(("L", "w1")), by.get(("M1", "w1"))
    m3 = by.get(("M3", "w1"))
    P, tc2, L2 = by.get(("P", "w1")), by.get(("T-C", "w2")), by.get(("L", "w2"))
    if tc and L1:
        x = rate(tc) / rate(L1)
        row("T-C >= 1.8 x L (W1)", f"{x:.2f} x L", x >= 1.8)
    if tc and P:
        x = rate(tc) / rate(P)
        row("T-C >= 0.85 x P (W1)", f"{x:.2f} x P", x >= 0.85)
    if tc2 and L2:
        x = rate(tc2, "events") / rate(L2, "events")
        row("T-C >= 1.3 x L (W2)", f"{x:.2f} x L", x >= 1.3)
    if tc and m1:
        x = rate(tc) / rate(m1)
        row("T-C >= 100 x M1 (W1)", f"{x:,.0f} x", x >= 100)
    if tc and m3:
        x = rate(tc) / rate(m3)
        row("T-C >= 10 x M3 (W1)", f"{x:,.1f} x", x >= 10)
    if "T-C" in paced:
        h, clock = paced["T-C"]["hist"], paced["T-C"]["timer_ns"]
        row("C log call p50 <= 100 ns (PACED)", f"{fmt_ns(h.pct(50))} measured, of which the "
            f"clock pair is {clock} ns: {fmt_ns(h.pct(50) - clock)} net", h.pct(50) - clock <= 100)
        row("C log call p99 <= 2 µs (PACED)", f"{fmt_ns(h.pct(99))}; steady calls (not the first "
            f"after a sleep) {fmt_ns(paced['T-C']['hist_steady'].pct(99))}", h.pct(99) <= 2000)
    if "T-Py" in paced:
        h = paced["T-Py"]["hist"]
        row("trackd.log_metric p50 <= 1 µs (PACED)", fmt_ns(h.pct(50)), h.pct(50) <= 1000)
    tm, m1p, tpy = by.get(("T-M", "w1")), by.get(("M1", "w1")), by.get(("T-Py", "w1"))
    if tm:
        p50 = tm["hist"].pct(50)
        row("mlflow.log_metric p50 <= 5 µs under trackd: (T-M, W1)", fmt_ns(p50), p50 <= 5000)
    if tm and tpy:
        x = rate(tm) / rate(tpy)
        row("T-M throughput >= 0.8 x T-Py (W1)", f"{x:.2f} x T-Py", x >= 0.8)
    if tm and m1p:
        x = m1p["hist"].pct(50) / tm["hist"].pct(50)
        row("T-M per call >= 20 x faster than M1 (W1 p50)", f"{x:,.0f} x", x >= 20)
    if tc and tc.get("rss_mib"):
        row("agent peak RSS <= 48 MiB during W1", f"{tc['rss_mib']:.1f} MiB", tc["rss_mib"] <= 48)
    if "T-C" in paced and paced["T-C"].get("visible"):
        v = quantile(paced["T-C"]["visible"], 99)
        row("log-to-visible p99 <= 1 s at default settings (PACED, T-C)", f"{v * 1e3:.0f} ms", v <= 1)
    if b.w3:
        x = b.w3["ratio"]
        row("W1 during the W3 upload >= 0.95 x alone (median of pairs)", f"{x:.2f} x alone",
            x >= 0.95)
    for name, value, ok in importing.targets(b.imports) if b.imports else ():
        row(name, value, ok)
    return out + [""] if len(out) > 4 else []


def plots(b, out_dir, stem):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    for ax, mode, order, what in ((axes[0], "w1", W1_ORDER, "points"), (axes[1], "w2", W2_ORDER, "events")):
        rows = {r["contender"]: r for r in b.rows if r["mode"] == mode}
        names = [c for c in order if c in rows]
        vals = [rate(rows[c], what) for c in names]
        ax.barh(names[::-1], vals[::-1], color=["#888" if c == "L" else "#2a7" if c.startswith("T")
                                                 else "#c55" for c in names[::-1]])
        ax.set_xscale("log")
        ax.set_xlabel(f"{what} per second until durable (log scale)")
        ax.set_title(f"{mode.upper()} throughput")
        for y, v in enumerate(vals[::-1]):
            ax.text(v, y, f" {v:,.0f}", va="center", fontsize=8)
    fig.tight_layout()
    fig.savefig(f"{stem}-throughput.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 5))
    curves = [(f"{r['contender']} (paced)", r["hist"]) for r in b.paced]
    curves += [(f"{r['contender']} (W1)", r["hist"]) for r in b.rows
               if r["mode"] == "w1" and r["contender"] in ("M1", "M2") and r.get("hist")]
    for label, h in curves:
        xs, ys = h.cdf()
        ax.step(xs, ys, where="post", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("per-call latency in the training process (ns, log scale)")
    ax.set_ylabel("fraction of calls")
    ax.set_title("log call latency CDF")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(f"{stem}-latency.png", dpi=110)
    plt.close(fig)
    print(f"plots: {stem}-throughput.png {stem}-latency.png")


def attempt(b, what, fn):
    """Runs one part; a failure is logged and reported instead of losing the whole bench."""
    try:
        return fn() or True
    except Exception as e:  # noqa: BLE001 - reported in the results file
        log(f"{what} FAILED: {e}")
        b.failures.append((what, str(e).splitlines()[0][:300]))
        return None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=float, default=1.0,
                    help="multiplies W1's steps and W2's runs (default 1: the full workloads)")
    ap.add_argument("--only", default=ONLY_ALL, help="comma-separated parts to run")
    ap.add_argument("--w4-rows", type=int, default=W4_ROWS,
                    help="rows W4 puts into metrics before its W1 (default 10,000,000)")
    ap.add_argument("--contenders", default="", help="comma-separated contenders for W1/W2 (default all)")
    ap.add_argument("--artifact-mib", type=int, default=512)
    ap.add_argument("--w3-pairs", type=int, default=3,
                    help="W3: pairs of W1 runs, alone and during the upload (the median counts)")
    ap.add_argument("--smoke", action="store_true",
                    help="a tiny run of every part (checks the driver, not the speed)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()
    global PACED_SECONDS
    if args.smoke:
        args.scale, args.artifact_mib, PACED_SECONDS, args.w4_rows = 0.001, 4, 1, 10_000
        args.w3_pairs = 1
    parts = {p.strip().upper() for p in args.only.split(",")}
    only = {c.strip() for c in args.contenders.split(",") if c.strip()}
    started = time.strftime("%Y-%m-%d %H:%M")
    b = Bench(args)
    b.t_start = time.monotonic()
    try:
        log("bootstrapping MLflow's schema ...")
        b.pg.bootstrap_template(b.work / "mlruns")
        if "W1" in parts:
            if not only or "L" in only:
                attempt(b, "W1 L", lambda: b.rows.append(b.run_limit_w1()))
            for c, conns in (("L-direct", 1), ("P", 2)):
                if not only or c in only:
                    attempt(b, f"W1 {c}", lambda: b.rows.append(b.run_direct_w1(c, conns)))
            for c in [c for c in W1_ORDER[3:] if not only or c in only]:
                r = attempt(b, f"W1 {c}", lambda: b.run_contender(c, "w1"))
                if r:
                    b.rows.append(r)
        if "W2" in parts:
            if not only or "L" in only:
                attempt(b, "W2 L", lambda: b.rows.append(b.run_limit_w2()))
            for c in [c for c in W2_ORDER[1:] if not only or c in only]:
                attempt(b, f"W2 {c}", lambda: b.rows.append(b.run_contender(c, "w2")))
        if "PACED" in parts:
            for c in [c for c in ("T-C", "T-Py", "T-M", "M3") if not only or c in only]:
                # M3 commits about 100 points/s on this workload (see W1): pace it below that.
                rate = M3_PACED_RATE if c == "M3" else PACED_RATE
                attempt(b, f"PACED {c}", lambda: b.paced.append(
                    b.run_contender(c, "w1", rate=rate, poll="steps")))
        if "W3" in parts:
            attempt(b, "W3", b.run_w3)
        if "W4" in parts:
            b.prefill = args.w4_rows
            if not only or "L" in only:
                attempt(b, "W4 L", lambda: b.w4.append(b.run_limit_w1()))
            if not only or "T-C" in only:
                attempt(b, "W4 T-C", lambda: b.w4.append(b.run_contender("T-C", "w1")))
            b.prefill = 0
        if "SCALE" in parts:
            for n in (1, 4, 16):
                attempt(b, f"SCALE {n} agents", lambda: b.scale_rows.append(
                    b.run_contender("T-C", "w1", n_agents=n, poll="connections", same_total=True)))
        if "IMPORT" in parts:
            def import_part():
                b.imports = importing.run(b, args.scale, log)
            attempt(b, "IMPORT", import_part)
        path = write_report(b, args, started)
        log(f"results: {path}")
    finally:
        b.close()
    if args.smoke and b.failures:
        sys.exit(f"bench smoke run: {len(b.failures)} part(s) failed (see above)")


if __name__ == "__main__":
    main()
