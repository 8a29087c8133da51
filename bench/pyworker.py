"""One training process of a bench workload, through a Python logging API, timing every call.

    python bench/pyworker.py CONTENDER w1 --keys 50 --steps 20000 [--rate POINTS_PER_S]
    python bench/pyworker.py CONTENDER w2 --runs 250 --params 20 --tags 10 --keys 5 --steps 100

CONTENDER is one of
  T-Py  trackd.log_metric & co. (the trackd package; TRACKD_SOCKET names the agent)
  T-M   mlflow.log_metric & co. under MLFLOW_TRACKING_URI=trackd:...
  M1    mlflow.log_metric & co. under MLFLOW_TRACKING_URI=postgresql://...
  M2    MlflowClient.log_batch with up to 1,000 metrics per call
  M3    mlflow.log_metric & co. with MLFLOW_ENABLE_ASYNC_LOGGING=true (set by the caller)
Prints one JSON object in the format of trackd-loadgen (histogram buckets included), with
"t_durable" taken when everything logged is readable: after trackd.flush() for T-Py, after
mlflow.get_run() (which waits for the agent) for T-M, after flush_async_logging() for M3, and
at the last call's return for the synchronous M1 and M2.
"""
import argparse
import json
import sys
import time

import numpy as np

TS0 = 1_700_000_000_000


def buckets(ns):
    """The log-linear buckets of trackd-loadgen: exact below 128 ns, 64 per power of two."""
    ns = np.asarray(ns, dtype=np.int64)
    ns = np.maximum(ns, 0)
    out = ns.copy()
    big = ns >= 128
    e = np.floor(np.log2(ns[big].astype(np.float64))).astype(np.int64)
    # log2 of a float can round up just below a power of two: correct it.
    e = np.where((np.int64(1) << e) > ns[big], e - 1, e)
    out[big] = 128 + (e - 7) * 64 + ((ns[big] >> (e - 6)) & 63)
    idx, cnt = np.unique(out, return_counts=True)
    return [[int(i), int(c)] for i, c in zip(idx, cnt)]


class Timer:
    def __init__(self):
        self.lat = []
        self.first = []

    def __call__(self, fn, *a, first=False, **kw):
        t = time.perf_counter_ns()
        r = fn(*a, **kw)
        (self.first if first else self.lat).append(time.perf_counter_ns() - t)
        return r


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("contender", choices=["T-Py", "T-M", "M1", "M2", "M3"])
    ap.add_argument("mode", choices=["w1", "w2"])
    ap.add_argument("--keys", type=int, default=50)
    ap.add_argument("--steps", type=int, default=20000)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--params", type=int, default=0)
    ap.add_argument("--tags", type=int, default=0)
    ap.add_argument("--rate", type=float, default=0)
    ap.add_argument("--experiment", default="bench")
    ap.add_argument("--name", default="worker")
    ap.add_argument("--go", action="store_true",
                    help="once imported, print 'ready' and start on a line from stdin")
    a = ap.parse_args()
    if a.mode == "w1":
        a.runs = 1
    keys = [f"m{k}" for k in range(a.keys)]
    timer = Timer()
    probe = []
    points = events = 0
    run_ids = []

    if a.contender == "T-Py":
        import trackd
        api = trackd
        exp_kw = {"experiment": a.experiment}
        if a.mode == "w2":
            tclient = trackd.get_client()
    else:
        import mlflow
        from mlflow.entities import Metric, Param, RunTag
        from mlflow.tracking import MlflowClient
        api = mlflow
        exp = mlflow.set_experiment(a.experiment)
        client = MlflowClient()
    if a.go:
        print("ready", flush=True)
        sys.stdin.readline()
    t0 = time.monotonic()
    for r in range(a.runs):
        name = f"{a.name}-{r}" if a.runs > 1 else a.name
        params = {f"p{k}": str(r * 1000 + k) for k in range(a.params)}
        tags = {f"t{k}": "value" for k in range(a.tags)}
        if a.contender == "M2":
            run = timer(client.create_run, exp.experiment_id, run_name=name)
            run_id = run.info.run_id
            batch = [Metric(keys[k], (s * a.keys + k) * 0.5, TS0 + s, s)
                     for s in range(a.steps) for k in range(a.keys)]
            ps = [Param(k, v) for k, v in params.items()]
            ts = [RunTag(k, v) for k, v in tags.items()]
            first = True
            for i in range(0, max(len(batch), 1), 1000):
                timer(client.log_batch, run_id, metrics=batch[i:i + 1000],
                      params=ps if first else [], tags=ts if first else [])
                first = False
            if a.mode == "w2":
                timer(client.set_terminated, run_id)
            run_ids.append(run_id)
            points += len(batch)
            events += 1 + len(batch) + len(ps) + len(ts) + (a.mode == "w2")
            continue
        if a.contender == "T-Py" and a.mode == "w2":
            # Many runs: the Client API, whose end_run does not wait for the agent.
            run_id = trackd.new_run_id()
            timer(tclient.start_run, run_id, a.experiment, name)
            run_ids.append(run_id)
            timer(tclient.log_params, run_id, params)
            timer(tclient.set_tags, run_id, tags)
            for s in range(a.steps):
                for k in range(a.keys):
                    timer(tclient.log_metric, run_id, keys[k], (s * a.keys + k) * 0.5, s, TS0 + s)
            timer(tclient.end_run, run_id, "FINISHED")
            n = a.keys * a.steps
            points += n
            events += 2 + len(params) + len(tags) + n
            continue
        if a.contender == "T-Py":
            run = timer(trackd.start_run, run_name=name, **exp_kw)
            run_id = run.run_id
        else:
            run = timer(mlflow.start_run, run_name=name)
            run_id = run.info.run_id
        run_ids.append(run_id)
        events += 1
        if params:
            timer(api.log_params, params)
            events += len(params)
        if tags:
            timer(api.set_tags, tags)
            events += len(tags)
        step_s = a.keys / a.rate if a.rate else 0
        log = api.log_metric
        clock, lat, first = time.perf_counter_ns, timer.lat, timer.first
        base = time.monotonic()
        for s in range(a.steps):
            if a.rate:
                delay = base + s * step_s - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                probe.append([s, time.monotonic()])
            # Timed inline: a wrapper's own call would be counted as the API's.
            for k in range(a.keys):
                v, ts = (s * a.keys + k) * 0.5, TS0 + s
                t = clock()
                log(keys[k], v, step=s, timestamp=ts)
                d = clock() - t
                (first if a.rate and k == 0 else lat).append(d)
        points += a.keys * a.steps
        events += a.keys * a.steps
        if a.contender != "T-Py":
            timer(mlflow.end_run)
            events += a.mode == "w2"
    t_logged = time.monotonic()
    ok = True
    if a.contender == "T-Py":
        ok = trackd.flush(timeout=3600)
        if trackd.active_run() is not None:
            trackd.end_run(timeout=None)
    elif a.contender == "T-M":
        mlflow.get_run(run_ids[-1])  # the store waits for the agent before it reads
    elif a.contender == "M3":
        mlflow.flush_async_logging()
    t_durable = time.monotonic()
    print(json.dumps({"mode": a.mode, "run_id": run_ids[-1], "run_ids": run_ids, "points": points,
                      "events": events, "dropped": 0, "errors": 0, "flush": 0 if ok else 1,
                      "t0": t0, "t_logged": t_logged, "t_durable": t_durable, "timer_ns": 0,
                      "hist": buckets(timer.lat), "hist_first": buckets(timer.first),
                      "probe": probe}))


if __name__ == "__main__":
    main()
