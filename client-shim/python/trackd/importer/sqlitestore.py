"""Reads an MLflow SQLite store (`sqlite:///mlflow.db`): the same tables as the target, so
rows are taken nearly as they are. What differs from PostgreSQL is checked here or by the
writer: SQLite keeps any value in any column (a REAL timestamp, a 64-bit experiment id, a
string longer than its VARCHAR), PostgreSQL does not.

The file is opened read-only, so a store that MLflow is still writing to is safe to read.
Traces and the GenAI tables (scorers, evaluation datasets, gateway, jobs) are not imported;
their rows are counted in the summary.
"""
from __future__ import annotations

import sqlite3
from collections import defaultdict
from pathlib import Path
from typing import Iterator, Optional
from urllib.parse import quote

from .entities import (Dataset, Experiment, Input, LoggedModel, ModelVersion, RegisteredModel,
                       Report, Run, SourceError)

#: Tables the import writes, and tables it leaves on purpose.
HANDLED = {"experiments", "experiment_tags", "runs", "params", "tags", "metrics",
           "latest_metrics", "datasets", "inputs", "input_tags", "logged_models",
           "logged_model_params", "logged_model_tags", "logged_model_metrics",
           "registered_models", "model_versions", "registered_model_tags",
           "model_version_tags", "registered_model_aliases", "alembic_version", "workspaces",
           "trace_info"}  # trace_info rows are counted per experiment, as "traces"


def _int(v) -> Optional[int]:
    """An integer column's value; SQLite may hold a REAL there. Integral ones are taken."""
    if v is None or isinstance(v, int):
        return v
    if isinstance(v, float) and v.is_integer():
        return int(v)
    raise ValueError(f"{v!r} is not an integer")


class SqliteReader:
    kind = "SQLite store"

    def __init__(self, path: Path, db: sqlite3.Connection, report: Report):
        self.path = path
        self.db = db
        self.report = report
        self.tables = {r[0] for r in db.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'")}
        self.ws = "workspace" in self._columns("experiments")

    @classmethod
    def open(cls, source: str, report: Report) -> "SqliteReader":
        path = source
        if source.startswith("sqlite:"):
            path = source[len("sqlite:"):]
            if not path.startswith("///"):
                raise SourceError(f"{source}: a SQLite URI is sqlite:///relative/path.db or "
                                  "sqlite:////absolute/path.db")
            path = path[3:]
        p = Path(path)
        if not p.is_file():
            raise SourceError(f"{source}: no such file")
        try:
            db = sqlite3.connect(f"file:{quote(str(p.resolve()))}?mode=ro", uri=True)
            db.execute("SELECT 1 FROM alembic_version").fetchall()
        except sqlite3.DatabaseError as e:
            raise SourceError(f"{source}: not an MLflow SQLite store ({e})") from None
        return cls(p, db, report)

    def _beside(self, *parts) -> str:
        """A path under the database's directory: where MLflow's default artifact root
        (./mlruns beside mlflow.db) keeps files when the store moved with it."""
        return str(Path(self.path).resolve().parent.joinpath(*map(str, parts)))

    def describe(self) -> str:
        return f"MLflow SQLite store {self.path}"

    def revision(self) -> Optional[str]:
        row = self.db.execute("SELECT version_num FROM alembic_version").fetchone()
        return row[0] if row else None

    def _columns(self, table: str) -> list:
        return [r[1] for r in self.db.execute(f"PRAGMA table_info({table})")]

    def _default_ws(self, table: str, alias: str = "") -> str:
        """The WHERE clause keeping the default workspace's rows of a table that has one."""
        if "workspace" in self._columns(table):
            return f" WHERE {alias}workspace = 'default'"
        return ""

    # ---- experiments -------------------------------------------------------------------

    def experiments(self) -> list:
        out = []
        rows = self.db.execute(
            "SELECT experiment_id, name, artifact_location, lifecycle_stage, creation_time, "
            "last_update_time FROM experiments" + self._default_ws("experiments")
            + " ORDER BY experiment_id").fetchall()
        tags = defaultdict(dict)
        for eid, k, v in self.db.execute("SELECT experiment_id, key, value FROM experiment_tags"):
            tags[eid][k] = v
        for eid, name, loc, stage, ct, ut in rows:
            out.append(Experiment(source_id=str(eid), name=name, artifact_location=loc,
                                  lifecycle_stage=stage or "active", creation_time=_int(ct),
                                  last_update_time=_int(ut), tags=tags.get(eid, {}),
                                  where=f"{self.path}, experiments.experiment_id {eid}"))
        if self.ws:
            other = self.db.execute("SELECT count(*) FROM experiments WHERE workspace <> "
                                    "'default'").fetchone()[0]
            if other:
                self.report.add("experiments of other workspaces not imported", other)
        return out

    def count_runs(self, e: Experiment) -> int:
        return self.db.execute("SELECT count(*) FROM runs WHERE experiment_id = ?",
                               [int(e.source_id)]).fetchone()[0]

    def traces(self, e: Experiment) -> int:
        if "trace_info" not in self.tables:
            return 0
        return self.db.execute("SELECT count(*) FROM trace_info WHERE experiment_id = ?",
                               [int(e.source_id)]).fetchone()[0]

    def datasets(self, e: Experiment) -> list:
        return [Dataset(key=("uuid", u), experiment=e.source_id, name=n, digest=d,
                        source_type=st, source=s, schema=sc, profile=pr, uuid=u)
                for u, n, d, st, s, sc, pr in self.db.execute(
                    "SELECT dataset_uuid, name, digest, dataset_source_type, dataset_source, "
                    "dataset_schema, dataset_profile FROM datasets WHERE experiment_id = ?",
                    [int(e.source_id)])]

    # ---- runs --------------------------------------------------------------------------

    def runs(self, e: Experiment) -> Iterator[Run]:
        cols = ["run_uuid", "name", "source_type", "source_name", "entry_point_name", "user_id",
                "status", "start_time", "end_time", "deleted_time", "source_version",
                "lifecycle_stage", "artifact_uri"]
        rows = self.db.execute(f"SELECT {', '.join(cols)} FROM runs WHERE experiment_id = ? "
                               "ORDER BY run_uuid", [int(e.source_id)]).fetchall()
        for row in rows:
            r = dict(zip(cols, row))
            rid = r["run_uuid"]
            where = f"{self.path}, runs.run_uuid {rid}"
            try:
                for c in ("start_time", "end_time", "deleted_time"):
                    r[c] = _int(r[c])
            except ValueError as err:
                self.report.refuse("runs", f"run {rid} ({where}): {err}")
                continue
            run = Run(run_uuid=rid, experiment=e.source_id, where=where,
                      artifact_fallback=self._beside("mlruns", e.source_id, rid, "artifacts"),
                      **{c: r[c] for c in cols[1:]})
            run.source_name = run.source_name or ""
            run.entry_point_name = run.entry_point_name or ""
            run.source_version = run.source_version or ""
            run.params = dict(self.db.execute("SELECT key, value FROM params WHERE run_uuid = ?",
                                              [rid]))
            run.tags = dict(self.db.execute("SELECT key, value FROM tags WHERE run_uuid = ?",
                                            [rid]))
            self._metrics(run)
            self._inputs(run)
            yield run

    def _metrics(self, run: Run) -> None:
        """Metric keys with a reader for each: a run's points are read one key at a time."""
        for key, n in self.db.execute("SELECT key, count(*) FROM metrics WHERE run_uuid = ? "
                                      "GROUP BY key", [run.run_uuid]).fetchall():
            run.metrics[key] = (lambda key=key: self._points(run, key))
            run.size_hint += n
        run.latest = {}
        for key, ts, step, value, is_nan in self.db.execute(
                "SELECT key, timestamp, step, value, is_nan FROM latest_metrics "
                "WHERE run_uuid = ?", [run.run_uuid]):
            try:
                run.latest[key] = (_int(ts), _int(step), float(value), bool(is_nan))
            except (TypeError, ValueError):
                pass  # recomputed from the points

    def _points(self, run: Run, key: str) -> list:
        out, bad = [], 0
        for ts, step, value, is_nan in self.db.execute(
                "SELECT timestamp, step, value, is_nan FROM metrics WHERE run_uuid = ? AND "
                "key = ?", [run.run_uuid, key]):
            try:
                out.append((_int(ts), _int(step), float(value), bool(is_nan)))
            except (TypeError, ValueError):
                bad += 1
        if bad:
            self.report.add("metric points unreadable", bad)
            self.report.warn(f"skipped {bad} points of metric {key!r} of run {run.run_uuid} "
                             "whose timestamp or step is not an integer",
                             "unreadable metric point")
        return out

    def _inputs(self, run: Run) -> None:
        rid = run.run_uuid
        rows = self.db.execute(
            "SELECT input_uuid, source_type, source_id, destination_type, destination_id, step "
            "FROM inputs WHERE (destination_type = 'RUN' AND destination_id = ?) "
            "OR (source_type IN ('RUN_INPUT', 'RUN_OUTPUT') AND source_id = ?)",
            [rid, rid]).fetchall()
        for iid, st, sid, dt, did, step in rows:
            tags = dict(self.db.execute("SELECT name, value FROM input_tags WHERE input_uuid = ?",
                                        [iid]))
            if st == "DATASET":
                run.inputs.append(Input(st, "", dt, did, _int(step) or 0,
                                        dataset_key=("uuid", sid), tags=tags))
            else:
                run.inputs.append(Input(st, sid, dt, did, _int(step) or 0, tags=tags))

    # ---- logged models -----------------------------------------------------------------

    def logged_models(self, e: Experiment) -> Iterator[LoggedModel]:
        if "logged_models" not in self.tables:
            return
        cols = ["model_id", "name", "artifact_location", "creation_timestamp_ms",
                "last_updated_timestamp_ms", "status", "lifecycle_stage", "model_type",
                "source_run_id", "status_message"]
        for row in self.db.execute(f"SELECT {', '.join(cols)} FROM logged_models "
                                   "WHERE experiment_id = ? ORDER BY model_id",
                                   [int(e.source_id)]).fetchall():
            m = LoggedModel(experiment=e.source_id, **dict(zip(cols, row)),
                            where=f"{self.path}, logged_models.model_id {row[0]}",
                            artifact_fallback=self._beside("mlruns", e.source_id, "models",
                                                           row[0], "artifacts"))
            m.lifecycle_stage = m.lifecycle_stage or "active"
            m.params = dict(self.db.execute(
                "SELECT param_key, param_value FROM logged_model_params WHERE model_id = ?",
                [m.model_id]))
            m.tags = dict(self.db.execute(
                "SELECT tag_key, tag_value FROM logged_model_tags WHERE model_id = ?",
                [m.model_id]))
            m.metrics = lambda mid=m.model_id: iter(self.db.execute(
                "SELECT metric_name, metric_timestamp_ms, metric_step, metric_value, run_id, "
                "dataset_uuid, dataset_name, dataset_digest FROM logged_model_metrics "
                "WHERE model_id = ?", [mid]).fetchall())
            yield m

    # ---- model registry ----------------------------------------------------------------

    def registered_models(self) -> Iterator[RegisteredModel]:
        for name, ct, ut, desc in self.db.execute(
                "SELECT name, creation_time, last_updated_time, description FROM "
                "registered_models" + self._default_ws("registered_models")
                + " ORDER BY name").fetchall():
            rm = RegisteredModel(name=name, creation_time=_int(ct), last_updated_time=_int(ut),
                                 description=desc, where=f"{self.path}, registered_models {name}")
            rm.tags = dict(self.db.execute(
                "SELECT key, value FROM registered_model_tags WHERE name = ?", [name]))
            rm.aliases = dict(self.db.execute(
                "SELECT alias, version FROM registered_model_aliases WHERE name = ?", [name]))
            vcols = ["version", "creation_time", "last_updated_time", "description", "user_id",
                     "current_stage", "source", "run_id", "status", "status_message",
                     "run_link", "storage_location"]
            have = set(self._columns("model_versions"))
            sel = [c if c in have else "NULL" for c in vcols]
            for row in self.db.execute(f"SELECT {', '.join(sel)} FROM model_versions "
                                       "WHERE name = ? ORDER BY version", [name]).fetchall():
                v = ModelVersion(**dict(zip(vcols, row)))
                v.current_stage = v.current_stage or "None"
                v.status = v.status or "READY"
                v.tags = dict(self.db.execute(
                    "SELECT key, value FROM model_version_tags WHERE name = ? AND version = ?",
                    [name, v.version]))
                rm.versions.append(v)
            yield rm

    def skipped_tables(self) -> dict:
        """Rows of the tables the import leaves, by table, for the summary."""
        out = {}
        for t in sorted(self.tables - HANDLED):
            if t.startswith("sqlite_"):
                continue
            n = self.db.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0]
            if n:
                out[t] = n
        return out
