"""MLflow's own server reads what trackd wrote: a run logged through the shim and the
agent is served by `mlflow server` over REST exactly as logged, and its UI, in headless
Chromium, shows the run and draws its metric charts."""
import math
import os
import pwd
import random
from pathlib import Path
from types import SimpleNamespace

import pytest

from harness import Agent, driver_errors, driver_runs, run_driver, wait_for
from mlflow_server import MlflowServer

DBL_MAX = 1.7976931348623157e308
TS0 = 1_700_000_000_000
STEPS = 500
KEYS = ["train/loss", "train/acc", "lr"]
EXPERIMENT = "served-exp"
RUN_NAME = "served-run"
PARAMS = {"learning_rate": "0.01", "batch_size": "64", "optimizer": "adam"}
START_TAGS = {"team": "ml", "phase": "served"}
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def value_for(key_index, step):
    if step == 100:
        return math.nan
    if step == 200:
        return math.inf
    if step == 300:
        return -math.inf
    return round(math.sin(step / 40.0 + key_index) * 10.0 + key_index, 6)


def timestamp_for(key_index, step):
    return TS0 + step * 10 + key_index


def rest_value(v):
    """What MLflow's REST API returns for a logged value: NaN as the string "NaN",
    infinities as the ±DBL_MAX that MLflow stores for them."""
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return DBL_MAX if v > 0 else -DBL_MAX
    return v


@pytest.fixture(scope="module")
def served(pg, artifact_root, tmp_path_factory):
    """One run logged through the shim and agent, then `mlflow server` on its database.
    Module scope: MLflow takes 10-20 s to start on a 2-core machine."""
    work = tmp_path_factory.mktemp("mlflow_server")
    db = pg.mlflow_db("t_mlflow_server")
    agent = Agent(pg, db, work / "agent", artifact_root=str(artifact_root)).start()
    start_tags = [f for kv in START_TAGS.items() for f in kv]
    lines = [["run", "r", EXPERIMENT, RUN_NAME, str(TS0), *start_tags]]
    lines += [["param", "r", k, v] for k, v in PARAMS.items()]
    lines += [["tag", "r", "note", "read back by mlflow server"]]
    points = [(k, ki, s) for ki, k in enumerate(KEYS) for s in range(STEPS)]
    random.Random(3).shuffle(points)  # arrival order must not matter to what MLflow serves
    lines += [["metric", "r", k, repr(value_for(ki, s)), str(s), str(timestamp_for(ki, s))]
              for k, ki, s in points]
    lines += [["end", "r", "FINISHED", str(TS0 + 3_600_000)], ["flush", "60000"], ["errors"]]
    try:
        out, _ = run_driver(agent.socket, lines, source_name="train.py")
    finally:
        rc = agent.stop()
    assert rc == 0, f"agent exit code {rc}; log:\n{agent.log()[-4000:]}"
    assert ["flush", "0"] in out
    assert driver_errors(out) == []
    run_id = driver_runs(out)["r"]
    (exp_id,), = pg.query(db, "SELECT experiment_id FROM experiments WHERE name = %s", (EXPERIMENT,))
    with MlflowServer(pg.url(db), work / "mlflow") as server:
        yield SimpleNamespace(server=server, run_id=run_id, exp_id=str(exp_id))


def test_rest_api_serves_the_run(served):
    server, run_id, exp_id = served.server, served.run_id, served.exp_id

    for ki, key in enumerate(KEYS):
        history = server.get("metrics/get-history", run_id=run_id, metric_key=key)
        assert set(history) == {"metrics"}, "one page, no next_page_token"
        got = sorted(history["metrics"], key=lambda m: m["step"])
        assert got == [{"key": key, "value": rest_value(value_for(ki, s)),
                        "timestamp": timestamp_for(ki, s), "step": s} for s in range(STEPS)]

    experiment = server.get("experiments/get-by-name", experiment_name=EXPERIMENT)["experiment"]
    assert experiment["experiment_id"] == exp_id
    assert experiment["name"] == EXPERIMENT
    assert experiment["lifecycle_stage"] == "active"
    assert experiment["artifact_location"].endswith(f"/{exp_id}")

    run = server.get("runs/get", run_id=run_id)["run"]
    user = pwd.getpwuid(os.geteuid()).pw_name
    assert run["info"] == {
        "run_uuid": run_id, "run_id": run_id, "experiment_id": exp_id, "run_name": RUN_NAME,
        "user_id": user, "status": "FINISHED", "start_time": TS0, "end_time": TS0 + 3_600_000,
        "artifact_uri": f"{experiment['artifact_location']}/{run_id}/artifacts",
        "lifecycle_stage": "active"}
    assert {p["key"]: p["value"] for p in run["data"]["params"]} == PARAMS
    assert {t["key"]: t["value"] for t in run["data"]["tags"]} == {
        **START_TAGS, "note": "read back by mlflow server", "mlflow.runName": RUN_NAME,
        "mlflow.user": user, "mlflow.source.name": "train.py", "mlflow.source.type": "LOCAL"}
    last = STEPS - 1
    assert sorted(run["data"]["metrics"], key=lambda m: m["key"]) == sorted(
        ({"key": k, "value": value_for(ki, last), "timestamp": timestamp_for(ki, last), "step": last}
         for ki, k in enumerate(KEYS)), key=lambda m: m["key"])

    found = server.post("runs/search", {"experiment_ids": [exp_id]})
    assert [r["info"]["run_id"] for r in found["runs"]] == [run_id]
    # The filter reads params, tags and latest_metrics: all three as trackd wrote them.
    loss_last = value_for(0, last)
    found = server.post("runs/search", {
        "experiment_ids": [exp_id],
        "filter": f"params.optimizer = 'adam' AND tags.team = 'ml' AND attributes.run_name = "
                  f"'{RUN_NAME}' AND metrics.`train/loss` > {loss_last - 0.5} AND "
                  f"metrics.`train/loss` < {loss_last + 0.5}"})
    assert [r["info"]["run_id"] for r in found["runs"]] == [run_id]
    found = server.post("runs/search",
                        {"experiment_ids": [exp_id], "filter": "params.optimizer = 'sgd'"})
    assert found.get("runs", []) == []


def _body_text(page):
    return page.evaluate("() => document.body ? document.body.innerText : ''")


# What the chart of one metric holds once drawn: the legend text MLflow gives the trace,
# whether a plotly SVG is there, how many line segments its paths draw (plotly merges
# collinear points and breaks the line at NaN and infinities) and the plotted (x, y) pairs.
CHART_JS = """(legend) => {
  const card = [...document.querySelectorAll('[data-testid="experiment-view-compare-runs-card"]')]
    .find(c => c.innerText.includes(legend));
  if (!card) return null;
  const plot = card.querySelector('.js-plotly-plot');
  const paths = [...card.querySelectorAll('.scatterlayer .trace path.js-line')];
  return {
    text: card.innerText,
    svg: card.querySelectorAll('.main-svg').length,
    segments: paths.reduce((n, p) => n + ((p.getAttribute('d') || '').match(/L/g) || []).length, 0),
    traces: (plot && plot.data || []).map(t => ({name: t.name, x: [...(t.x || [])],
                                                 y: [...(t.y || [])]})),
  };
}"""


def _drawn_chart(page, legend):
    """The chart's state once plotly has drawn a line through many points, else None."""
    chart = page.evaluate(CHART_JS, legend)
    if chart and chart["svg"] and chart["segments"] >= 50 and chart["traces"]:
        return chart
    return None


@pytest.mark.skipif(not CHROMIUM.exists() and not os.environ.get("CI"),
                    reason=f"{CHROMIUM} is missing (apt-get install chromium); under CI this fails")
def test_ui_shows_run_and_metric_chart(served, tmp_path):
    assert CHROMIUM.exists(), f"{CHROMIUM} is missing: the CI setup must install Debian's chromium"
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the Python package playwright is missing: pip install -r tests/requirements.txt")

    server, run_id, exp_id = served.server, served.run_id, served.exp_id
    key, key_index = "train/loss", 0
    legend = f"{RUN_NAME} ({key})"
    server_errors = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(60_000)
            page.on("response",
                    lambda r: r.status >= 500 and server_errors.append(f"{r.status} {r.url}"))

            page.goto(f"{server.url}/#/experiments/{exp_id}/runs/{run_id}")
            wait_for(lambda: RUN_NAME in _body_text(page), 90, "the run page to show the run name",
                     interval=0.2)
            wait_for(lambda: all(k in _body_text(page) for k in KEYS), 60,
                     "the run page to list the metric keys", interval=0.2)
            overview = _body_text(page)
            assert run_id in overview
            assert "adam" in overview and "optimizer" in overview
            page.screenshot(path=str(tmp_path / "mlflow-run-overview.png"))

            page.get_by_role("tab", name="Model metrics").click()
            wait_for(lambda: page.url.endswith(f"/runs/{run_id}/model-metrics"), 30,
                     "the Model metrics tab")
            # Bring the card into view, as a reader would, before waiting for it to draw.
            card = page.locator('[data-testid="experiment-view-compare-runs-card"]',
                                has_text=legend)
            card.scroll_into_view_if_needed()
            png = tmp_path / "mlflow-run-metrics.png"
            try:
                chart = wait_for(lambda: _drawn_chart(page, legend), 90, f"the chart of {key} to draw",
                                 interval=0.2)
            finally:
                page.screenshot(path=str(png), full_page=True)
            print(f"screenshot: {png}")
        finally:
            browser.close()

    assert legend in chart["text"]
    # The UI samples the history (about 320 points) and shows NaN as a gap and the
    # stored ±DBL_MAX as ±Infinity; every point it plots must be one trackd wrote.
    for trace in chart["traces"]:
        assert trace["name"] == RUN_NAME
        assert len(trace["x"]) == len(trace["y"]) >= 100
        assert trace["x"][0] == 0 and trace["x"][-1] == STEPS - 1
        for step, y in zip(trace["x"], trace["y"]):
            want = value_for(key_index, step)
            assert (math.isnan(y) and math.isnan(want)) or y == want, (step, y, want)
    assert server_errors == []
