"""Writes what a reader gives into MLflow's schema in PostgreSQL: experiments first (merged by
name, ids from MLflow's sequence when the source's id is taken or does not fit), then runs in
batches, one transaction each, with COPY; then logged models and the model registry.

A batch either commits whole or not at all, and a run, logged model or registered model that
is already in the target is compared and skipped, so running the same import again after an
interruption finishes it without duplicates.
"""
from __future__ import annotations

import uuid
from typing import Iterator, Optional

import psycopg

from .artifacts import ArtifactCopier, rewrite, under
from .entities import INT4_MAX, Experiment, Refused, Report, Run, dedupe

_ESC = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})

#: Values MLflow's SQL store truncates itself (MLFLOW_TRUNCATE_LONG_VALUES, on by default) or
#: that carry no identity: too long, they are cut to the column's length and counted.
#: Every other too-long value refuses its entity.
TRUNCATE = {("params", "value"), ("tags", "value"), ("registered_model_tags", "value"),
            ("registered_models", "description"), ("model_versions", "description"),
            ("model_versions", "status_message"), ("logged_models", "status_message"),
            ("input_tags", "value")}


def _copy_value(v) -> str:
    if v is None:
        return "\\N"
    if v is True:
        return "t"
    if v is False:
        return "f"
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, int):
        return str(v)
    return v.translate(_ESC)


class Target:
    """One PostgreSQL database with MLflow's schema, and the column lengths it enforces."""

    def __init__(self, conn: psycopg.Connection, report: Report, dry_run: bool = False,
                 copier: Optional[ArtifactCopier] = None):
        self.conn = conn
        self.report = report
        self.dry_run = dry_run
        #: With --copy-artifacts: copies artifacts and gives their new locations.
        self.copier = copier
        self.exp_location: dict = {}  # source experiment id -> target artifact_location
        self.moved: dict = {}         # source artifact location -> its copy's (for references)
        self.uncopied: dict = {}      # source artifact location -> what could not be copied
        self.columns: dict = {}  # table -> {column: character_maximum_length or None}
        for table, col, n in conn.execute(
                "SELECT table_name, column_name, character_maximum_length"
                "  FROM information_schema.columns WHERE table_schema = current_schema()"):
            self.columns.setdefault(table, {})[col] = n
        conn.commit()
        self.exp_map: dict = {}      # source experiment id -> target experiment id
        self.datasets: dict = {}     # reader's dataset key -> dataset_uuid in the target
        self.runs_present: set = set()  # run ids in the target that this import may refer to

    def revision(self) -> Optional[str]:
        row = self.conn.execute("SELECT version_num FROM alembic_version").fetchone()
        self.conn.commit()
        return row[0] if row else None

    def has(self, table: str) -> bool:
        return table in self.columns

    # ---- rows ----------------------------------------------------------------------------

    def fit(self, table: str, row: dict, what: str, quiet: bool = False) -> dict:
        """The row with only the target's columns, checked against their lengths; values in
        TRUNCATE are cut to fit (and counted, unless quiet). Raises Refused naming the column
        otherwise."""
        cols = self.columns.get(table)
        if cols is None:
            raise Refused(f"{what}: the target has no table {table} (an older MLflow schema)")
        out = {}
        for col, v in row.items():
            if col not in cols:
                continue
            if isinstance(v, str):
                if "\x00" in v:
                    raise Refused(f"{what}: {table}.{col} holds a NUL character, which "
                                  "PostgreSQL text cannot store")
                limit = cols[col]
                if limit is not None and len(v) > limit:
                    if (table, col) not in TRUNCATE:
                        raise Refused(f"{what}: {table}.{col} is {len(v)} characters long; "
                                      f"PostgreSQL's column holds {limit}")
                    v = v[:limit]
                    if quiet:
                        out[col] = v
                        continue
                    self.report.add("values truncated")
                    self.report.warn(f"truncated {what}: {table}.{col} from {len(row[col])} to "
                                     f"{limit} characters, as MLflow's SQL store does",
                                     "value truncated")
            out[col] = v
        return out

    def _commit(self, tables: list) -> None:
        """COPYs [(table, rows)] in order (nothing in a dry run), then commits."""
        if not self.dry_run:
            b = Batch()
            for table, rows in tables:
                b.add(table, rows)
            with self.conn.cursor() as cur:
                b.write(cur)
        self.conn.commit()

    # ---- experiments and datasets --------------------------------------------------------

    def experiments(self, exps: list, datasets_of) -> None:
        """Maps every source experiment to a target one: the target's experiment of the same
        name (the names are unique in MLflow, deleted ones included), else a new row with the
        source's id when it is free and fits PostgreSQL's integer, else the next id of MLflow's
        sequence. Tags the target lacks are added; datasets follow. One transaction."""
        ws = "workspace" in self.columns["experiments"]
        cur = self.conn.cursor()
        if not self.dry_run:
            # Holds off other writers' nextval() until the sequence is past any id kept here.
            cur.execute("LOCK TABLE experiments IN SHARE ROW EXCLUSIVE MODE")
        by_name, location = {}, {}
        for eid, name, loc in cur.execute(
                "SELECT experiment_id, name, artifact_location FROM experiments"
                + (" WHERE workspace = 'default'" if ws else "")):
            by_name[name], location[eid] = eid, loc
        taken, deleted = set(), set()
        for eid, stage in cur.execute("SELECT experiment_id, lifecycle_stage FROM experiments"):
            taken.add(eid)
            if stage == "deleted":
                deleted.add(eid)
        next_fake = -1
        explicit = False
        for e in exps:
            what = f"experiment {e.name!r} ({e.where})"
            try:
                row = self.fit("experiments", {
                    "name": e.name, "artifact_location": e.artifact_location,
                    "lifecycle_stage": e.lifecycle_stage, "creation_time": e.creation_time,
                    "last_update_time": e.last_update_time}, what)
                tags = [self.fit("experiment_tags", {"key": k, "value": v}, what)
                        for k, v in e.tags.items()]
            except Refused as err:
                self.report.refuse("experiments", str(err))
                continue
            if e.name in by_name:
                eid = by_name[e.name]
                self.report.add("experiments merged into an existing one")
                if (self.copier is not None and e.artifact_location
                        and location.get(eid) == e.artifact_location):
                    self.report.problems += 1
                    self.report.add("experiments whose runs' files stay where they are")
                    self.report.warn(
                        f"{what}: the target's experiment of that name (id {eid}) keeps its "
                        f"artifacts where the source has them, {e.artifact_location} (an "
                        "import without --copy-artifacts made it): its runs' files are not "
                        "copied", "artifacts not copied")
                if e.lifecycle_stage == "active" and eid in deleted:
                    self.report.problems += 1
                    self.report.add("experiments merged into a deleted one")
                    self.report.warn(
                        f"{what}: the target's experiment of that name (id {eid}) is deleted; "
                        "its runs go there and stay hidden until it is restored (`mlflow "
                        f"experiments restore --experiment-id {eid}` against the database)",
                        "merged into a deleted experiment")
            else:
                src = int(e.source_id) if e.source_id.isdigit() else -1
                if 0 <= src <= INT4_MAX and src not in taken:
                    eid = src
                    explicit = True
                    if self.copier is not None:
                        row["artifact_location"] = self.copier.experiment_location(eid)
                    if not self.dry_run:
                        cur.execute("INSERT INTO experiments (experiment_id, "
                                    + ", ".join(row) + ") VALUES (%s"
                                    + ", %s" * len(row) + ")", [eid, *row.values()])
                elif self.dry_run:
                    eid, next_fake = next_fake, next_fake - 1
                else:
                    eid = cur.execute("INSERT INTO experiments (" + ", ".join(row)
                                      + ") VALUES (" + ", ".join(["%s"] * len(row))
                                      + ") RETURNING experiment_id", list(row.values())).fetchone()[0]
                    if self.copier is not None:
                        # As the agent and MLflow's SQL store do: the location names the id.
                        row["artifact_location"] = self.copier.experiment_location(eid)
                        cur.execute("UPDATE experiments SET artifact_location = %s "
                                    "WHERE experiment_id = %s", [row["artifact_location"], eid])
                location[eid] = row["artifact_location"]
                taken.add(eid)
                by_name[e.name] = eid
                self.report.add("experiments imported")
            self.exp_map[e.source_id] = eid
            self.exp_location[e.source_id] = location.get(eid)
            if tags and not self.dry_run:
                cur.executemany("INSERT INTO experiment_tags (key, value, experiment_id) "
                                "VALUES (%s, %s, %s) ON CONFLICT DO NOTHING",
                                [(t["key"], t.get("value"), eid) for t in tags])
            self._datasets(cur, e, datasets_of(e))
        if explicit and not self.dry_run:
            seq = cur.execute("SELECT pg_get_serial_sequence('experiments', 'experiment_id')"
                              ).fetchone()[0]
            if seq:
                cur.execute("SELECT setval(%s, (SELECT max(experiment_id) FROM experiments)) "
                            "WHERE (SELECT max(experiment_id) FROM experiments) >= "
                            "COALESCE((SELECT last_value FROM pg_sequences WHERE "
                            "format('%%I.%%I', schemaname, sequencename) = %s), 1)", [seq, seq])
        self.conn.commit()

    def _datasets(self, cur, e: Experiment, datasets: list) -> None:
        eid = self.exp_map[e.source_id]
        for d in datasets:
            what = f"dataset {d.name!r} of experiment {e.name!r}"
            try:
                row = self.fit("datasets", {
                    "dataset_uuid": d.uuid or uuid.uuid4().hex, "experiment_id": eid,
                    "name": d.name, "digest": d.digest, "dataset_source_type": d.source_type,
                    "dataset_source": d.source, "dataset_schema": d.schema,
                    "dataset_profile": d.profile}, what)
            except Refused as err:
                self.report.refuse("datasets", str(err))
                continue
            if self.dry_run:
                self.datasets[d.key] = row["dataset_uuid"]
                self.report.add("datasets imported")
                continue
            cur.execute("INSERT INTO datasets (" + ", ".join(row) + ") VALUES ("
                        + ", ".join(["%s"] * len(row)) + ") ON CONFLICT DO NOTHING",
                        list(row.values()))
            self.report.add("datasets imported" if cur.rowcount else "datasets already present")
            self.datasets[d.key] = cur.execute(
                "SELECT dataset_uuid FROM datasets WHERE experiment_id = %s AND name = %s "
                "AND digest = %s", [eid, d.name, d.digest]).fetchone()[0]

    # ---- runs ----------------------------------------------------------------------------

    def _run_rows(self, run: Run, quiet: bool = False) -> dict:
        """Every row of a run but its metrics, checked; raises Refused. quiet: for a run only
        compared, truncations are not counted again."""
        what = f"run {run.run_uuid} ({run.where})"
        rows = {"runs": [self.fit("runs", {
            "run_uuid": run.run_uuid, "name": run.name, "source_type": run.source_type,
            "source_name": run.source_name, "entry_point_name": run.entry_point_name,
            "user_id": run.user_id, "status": run.status, "start_time": run.start_time,
            "end_time": run.end_time, "deleted_time": run.deleted_time,
            "source_version": run.source_version, "lifecycle_stage": run.lifecycle_stage,
            "artifact_uri": run.artifact_uri,
            "experiment_id": self.exp_map[run.experiment]}, what, quiet)]}
        rows["params"] = [self.fit("params", {"key": k, "value": v, "run_uuid": run.run_uuid},
                                   what, quiet) for k, v in run.params.items()]
        rows["tags"] = [self.fit("tags", {"key": k, "value": v, "run_uuid": run.run_uuid},
                                 what, quiet)
                        for k, v in run.tags.items()]
        limit = self.columns["metrics"]["key"]
        for k in run.metrics:
            if limit is not None and len(k) > limit:
                raise Refused(f"{what}: metric key {k[:40]!r}… is {len(k)} characters long; "
                              f"PostgreSQL's metrics.key holds {limit}")
            if "\x00" in k:
                raise Refused(f"{what}: metric key {k!r} holds a NUL character")
        inputs, input_tags = [], []
        for i in run.inputs:
            source_id = i.source_id
            if i.dataset_key is not None:
                source_id = self.datasets.get(i.dataset_key)
                if source_id is None:
                    self.report.add("run inputs skipped (dataset not found)")
                    continue
            iid = uuid.uuid4().hex
            inputs.append(self.fit("inputs", {
                "input_uuid": iid, "source_type": i.source_type, "source_id": source_id,
                "destination_type": i.destination_type, "destination_id": i.destination_id,
                "step": i.step}, what, quiet))
            input_tags += [self.fit("input_tags", {"input_uuid": iid, "name": k, "value": v},
                                    what, quiet) for k, v in i.tags.items()]
        rows["inputs"], rows["input_tags"] = inputs, input_tags
        return rows

    def _history(self, run: Run, key: str) -> tuple:
        """(distinct points, latest point) of one metric; counts duplicates dropped."""
        distinct, latest, dups = dedupe(run.metrics[key]())
        if dups:
            self.report.add("metric points duplicated in the source, kept once", dups)
        if run.latest is not None:
            latest = run.latest.get(key, latest)
        return distinct, latest

    def prepare_runs(self, runs: list, lazy: bool = False) -> "Batch":
        """The COPY data of one transaction for runs: runs, params, tags, every metric point,
        latest_metrics, inputs. Runs already in the target are compared instead, and left
        out. Reads the source's metric files here, in the caller's thread, while writer
        threads COPY earlier batches; lazy=True leaves that to Batch.write, key by key, so a
        run larger than memory streams (the caller then writes the batch itself)."""
        ids = [r.run_uuid for r in runs]
        existing = {rid for (rid,) in self.conn.execute(
            "SELECT run_uuid FROM runs WHERE run_uuid = ANY(%s)", [ids])}
        self.conn.commit()
        ready = []
        skipped = 0
        for run in runs:
            old = run.artifact_uri
            if self.copier is not None:
                run.artifact_uri = self.copier.run_uri(self._location(run.experiment),
                                                       run.run_uuid)
            if run.run_uuid in existing:
                self._compare_run(run, old)
                skipped += 1
                continue
            what = f"run {run.run_uuid} ({run.where})"
            try:
                rows = self._run_rows(run)
                if self._copy(old, run.artifact_uri, what, run.artifact_fallback) is False:
                    run.artifact_uri = old  # kept as recorded
                    rows["runs"][0]["artifact_uri"] = self.fit(
                        "runs", {"artifact_uri": old}, what)["artifact_uri"]
                ready.append((run, rows))
            except Refused as err:
                if self.copier is not None and old and old not in self.moved:
                    self.uncopied.setdefault(old, what)
                self.report.refuse("runs", str(err))
                skipped += 1
        batch = Batch(skipped)
        if not ready:
            return batch
        for table in ("runs", "params", "tags"):
            rows = [r for _, rr in ready for r in rr[table]]
            batch.add(table, rows)
            self.report.add(f"{table} imported", len(rows))
        latest_rows: list = []
        metrics = self._metric_text([run for run, _ in ready], batch, latest_rows)
        batch.copies.append(("COPY metrics (key, value, timestamp, run_uuid, step, is_nan) "
                             "FROM STDIN", metrics if lazy else "".join(metrics)))
        batch.copies.append((f"COPY latest_metrics ({', '.join(LATEST)}) FROM STDIN",
                             lambda: rows_text(latest_rows, LATEST)))
        for table in ("inputs", "input_tags"):
            batch.add(table, [r for _, rr in ready for r in rr[table]])
        batch.runs = len(ready)
        self.report.add("run inputs and outputs imported",
                        sum(len(rr["inputs"]) for _, rr in ready))
        self.runs_present.update(r.run_uuid for r, _ in ready)
        return batch

    def _location(self, source_experiment: str):
        loc = self.exp_location.get(source_experiment)
        return loc or self.copier.experiment_location(self.exp_map[source_experiment])

    def _copy(self, old: Optional[str], new: str, what: str,
              fallback: Optional[str]) -> Optional[bool]:
        """With --copy-artifacts, copies an entity's files from old to new before its rows
        are written (not in a dry run) and records the move for the registry's references.
        None without the option or when old is new; False when the files stay at old.
        Raises Refused when they cannot be copied: the registry's references to them wait."""
        if self.copier is None or not old or old == new:
            return None
        try:
            if not self.copier.copy(old, new, what, fallback, write=not self.dry_run):
                return False
        except Refused:
            self.uncopied[old] = what
            raise
        self.moved[old] = new
        return True

    def _metric_text(self, runs: list, batch: "Batch", latest_rows: list) -> Iterator[str]:
        """COPY text of every metric point of runs, one key at a time; fills latest_rows and
        counts the points into batch and the report once it is through."""
        for run in runs:
            rid = run.run_uuid
            for key in run.metrics:
                distinct, latest = self._history(run, key)
                k = key.translate(_ESC)
                yield "".join([f"{k}\t{v!r}\t{ts}\t{rid}\t{step}\t{'t' if n else 'f'}\n"
                               for ts, step, v, n in distinct])
                batch.points += len(distinct)
                if latest is not None:
                    latest_rows.append({"key": key, "value": latest[2], "timestamp": latest[0],
                                        "step": latest[1], "is_nan": bool(latest[3]),
                                        "run_uuid": rid})
        self.report.add("metric points imported", batch.points)
        self.report.add("latest_metrics imported", len(latest_rows))

    def write_now(self, batch: "Batch") -> None:
        """Writes and commits a batch on this thread's connection (a lazy one, above)."""
        with self.conn.cursor() as cur:
            if self.dry_run:
                batch.drain()
            else:
                batch.write(cur)
        self.conn.commit()

    def _compare_run(self, run: Run, recorded: Optional[str]) -> None:
        """A run already in the target: identical (an earlier import of the same source) is
        skipped quietly; anything else is reported and left as it is. recorded: the
        source's artifact_uri (run's may be the copy's); references to it follow the
        target's row."""
        self.runs_present.add(run.run_uuid)
        try:
            rows = self._run_rows(run, quiet=True)
        except Refused as err:
            self.report.refuse("runs", str(err))
            return
        want = rows["runs"][0]
        cols = list(want)
        have = self.conn.execute(f"SELECT {', '.join(cols)} FROM runs WHERE run_uuid = %s",
                                 [run.run_uuid]).fetchone()
        differs = [c for c, h in zip(cols, have) if want[c] != h]
        stored = have[cols.index("artifact_uri")]
        if recorded and stored and recorded != stored:
            self.moved[recorded] = stored
        kept = self.copier is not None and stored == recorded != want["artifact_uri"]
        if kept:
            # Imported before with its location as recorded: by an import without
            # --copy-artifacts, or because its files were not here to copy.
            differs.remove("artifact_uri")
            try:
                here = self.copier.locate(recorded, run.artifact_fallback)
            except (OSError, ValueError):
                here = None
            if here is not None:
                self.report.problems += 1
                self.report.add("runs already present, their files not copied")
                self.report.warn(f"run {run.run_uuid} ({run.where}) is already in the target "
                                 f"with its artifacts at {recorded}, as an import without "
                                 "--copy-artifacts left it: not copied", "run not copied")
        for table in ("params", "tags"):
            got = dict(self.conn.execute(f"SELECT key, value FROM {table} WHERE run_uuid = %s",
                                         [run.run_uuid]).fetchall())
            if got != {r["key"]: r["value"] for r in rows[table]}:
                differs.append(table)
        n_have = self.conn.execute("SELECT count(*) FROM metrics WHERE run_uuid = %s",
                                   [run.run_uuid]).fetchone()[0]
        latest_have = {k: (ts, step, v, n) for k, v, ts, step, n in self.conn.execute(
            "SELECT key, value, timestamp, step, is_nan FROM latest_metrics WHERE run_uuid = %s",
            [run.run_uuid])}
        n_want, latest_want = 0, {}
        for key in run.metrics:
            distinct, latest = self._history(run, key)
            n_want += len(distinct)
            if latest is not None:
                latest_want[key] = (latest[0], latest[1], latest[2], bool(latest[3]))
        if n_have != n_want:
            differs.append(f"metrics ({n_have} points in the target, {n_want} in the source)")
        elif latest_have != latest_want:
            differs.append("latest_metrics")
        self.conn.commit()
        if differs:
            self.report.problems += 1
            self.report.add("runs already in the target with other data")
            self.report.warn(f"run {run.run_uuid} ({run.where}) is already in the target with "
                             f"other data ({', '.join(differs)}); left as it is",
                             "run differs")
        else:
            self.report.add("runs already present")

    # ---- logged models -------------------------------------------------------------------

    def logged_model(self, m) -> None:
        what = f"logged model {m.model_id} ({m.where})"
        eid = self.exp_map[m.experiment]
        old = m.artifact_location
        if self.copier is not None:
            m.artifact_location = self.copier.model_uri(self._location(m.experiment),
                                                        m.model_id)
        have = self.conn.execute("SELECT artifact_location FROM logged_models WHERE model_id "
                                 "= %s", [m.model_id]).fetchone() \
            if self.has("logged_models") else None
        if have is not None:
            self.conn.commit()
            if old and have[0] and old != have[0]:
                self.moved[old] = have[0]
            self.report.add("logged models already present")
            return
        try:
            row = self.fit("logged_models", {
                "model_id": m.model_id, "experiment_id": eid, "name": m.name,
                "artifact_location": m.artifact_location,
                "creation_timestamp_ms": m.creation_timestamp_ms,
                "last_updated_timestamp_ms": m.last_updated_timestamp_ms, "status": m.status,
                "lifecycle_stage": m.lifecycle_stage, "model_type": m.model_type,
                "source_run_id": m.source_run_id, "status_message": m.status_message}, what)
            params = [self.fit("logged_model_params", {
                "model_id": m.model_id, "experiment_id": eid, "param_key": k, "param_value": v},
                what) for k, v in m.params.items()]
            tags = [self.fit("logged_model_tags", {
                "model_id": m.model_id, "experiment_id": eid, "tag_key": k, "tag_value": v},
                what) for k, v in m.tags.items()]
            metrics, seen = [], set()
            for name, ts, step, value, run_id, ds_uuid, ds_name, digest in m.metrics():
                if (name, ts, step, run_id) in seen:
                    continue  # the table's key has no value: MLflow keeps the first
                seen.add((name, ts, step, run_id))
                if run_id not in self.runs_present:
                    self.report.add("logged model metric points skipped (run not imported)")
                    continue
                metrics.append(self.fit("logged_model_metrics", {
                    "model_id": m.model_id, "metric_name": name, "metric_timestamp_ms": ts,
                    "metric_step": step, "metric_value": value, "experiment_id": eid,
                    "run_id": run_id, "dataset_uuid": ds_uuid, "dataset_name": ds_name,
                    "dataset_digest": digest}, what))
            if self._copy(old, m.artifact_location, what, m.artifact_fallback) is False:
                m.artifact_location = row["artifact_location"] = self.fit(
                    "logged_models", {"artifact_location": old}, what)["artifact_location"]
        except Refused as err:
            if self.copier is not None and old and old not in self.moved:
                self.uncopied.setdefault(old, what)
            self.report.refuse("logged models", str(err))
            return
        self._commit([("logged_models", [row]), ("logged_model_params", params),
                      ("logged_model_tags", tags), ("logged_model_metrics", metrics)])
        self.report.add("logged models imported")
        self.report.add("logged model metric points imported", len(metrics))

    # ---- model registry ------------------------------------------------------------------

    def registered_model(self, rm) -> None:
        """A registered model with its versions, tags and aliases, in one transaction. One
        already in the target is compared, row by row: the same is skipped, another is
        reported and left as it is."""
        what = f"registered model {rm.name!r} ({rm.where})"
        try:
            row = self.fit("registered_models", {
                "name": rm.name, "creation_time": rm.creation_time,
                "last_updated_time": rm.last_updated_time, "description": rm.description}, what)
            tags = [self.fit("registered_model_tags", {"key": k, "value": v, "name": rm.name},
                             what) for k, v in rm.tags.items()]
            versions, vtags = [], []
            for v in rm.versions:
                if not 0 < v.version <= INT4_MAX:
                    raise Refused(f"{what}: version {v.version} does not fit PostgreSQL's integer")
                for uri in (v.source, v.storage_location):
                    waits = under(uri, self.uncopied)
                    if waits is not None:
                        raise Refused(f"{what}: version {v.version} names {uri}, the files of "
                                      f"{self.uncopied[waits]}, which could not be copied; "
                                      "the same command imports it once they are")
                versions.append(self.fit("model_versions", {
                    "name": rm.name, "version": v.version, "creation_time": v.creation_time,
                    "last_updated_time": v.last_updated_time, "description": v.description,
                    "user_id": v.user_id, "current_stage": v.current_stage,
                    "source": rewrite(v.source, self.moved), "run_id": v.run_id,
                    "status": v.status, "status_message": v.status_message,
                    "run_link": v.run_link,
                    "storage_location": rewrite(v.storage_location, self.moved)}, what))
                vtags += [self.fit("model_version_tags", {
                    "key": k, "value": val, "name": rm.name, "version": v.version}, what)
                    for k, val in v.tags.items()]
            live = {v.version for v in rm.versions if v.current_stage != "Deleted_Internal"}
            aliases = [self.fit("registered_model_aliases", {
                "alias": a, "version": ver, "name": rm.name}, what)
                for a, ver in rm.aliases.items() if ver in live]
        except Refused as err:
            self.report.refuse("registered models", str(err))
            return
        tables = [("registered_models", [row]), ("model_versions", versions),
                  ("registered_model_tags", tags), ("model_version_tags", vtags),
                  ("registered_model_aliases", aliases)]
        if self.conn.execute("SELECT 1 FROM registered_models WHERE name = %s",
                             [rm.name]).fetchone():
            differs = [t for t, rows in tables if self._rows_differ(t, rows, rm.name)]
            self.conn.commit()
            if not differs:
                self.report.add("registered models already present")
                return
            self.report.problems += 1
            self.report.add("registered models already in the target with other data")
            self.report.warn(f"{what} is already in the target with other data "
                             f"({', '.join(differs)}); left as it is", "registered model differs")
            return
        self._commit(tables)
        self.report.add("registered models imported")
        self.report.add("model versions imported", len(versions))

    def _rows_differ(self, table: str, rows: list, name: str) -> bool:
        """Whether the target's rows of table for registered model name differ from rows
        (dicts), compared on rows' columns."""
        cols = list(rows[0]) if rows else ["name"]
        have = self.conn.execute(f"SELECT {', '.join(cols)} FROM {table} WHERE name = %s",
                                 [name]).fetchall()
        return sorted(map(repr, have)) != sorted(repr(tuple(r[c] for c in cols)) for r in rows)


#: latest_metrics' columns, in the order of the rows prepare_runs makes.
LATEST = ("key", "value", "timestamp", "step", "is_nan", "run_uuid")


def rows_text(rows: list, cols) -> str:
    """COPY text of rows (dicts) for the columns cols."""
    return "".join("\t".join(_copy_value(r[c]) for c in cols) + "\n" for r in rows)


class Batch:
    """The COPY statements of one transaction, in foreign-key order, with what they carry:
    text, a callable giving text (made once the COPYs before it ran), or an iterator of
    text chunks (read from the source while PostgreSQL takes them)."""

    def __init__(self, skipped: int = 0):
        self.copies: list = []  # (COPY statement, its data)
        self.runs = 0
        self.points = 0
        self.skipped = skipped  # runs of the batch left out (present, refused): progress only

    def add(self, table: str, rows: list) -> None:
        """Rows: dicts of one table with the same columns."""
        if rows:
            cols = list(rows[0])
            self.copies.append((f"COPY {table} ({', '.join(cols)}) FROM STDIN",
                                rows_text(rows, cols)))

    def write(self, cur: psycopg.Cursor) -> None:
        for statement, data in self.copies:
            if callable(data):
                data = data()
            if not data:
                continue
            with cur.copy(statement) as cp:
                if isinstance(data, str):
                    cp.write(data)
                else:
                    for chunk in data:
                        cp.write(chunk)

    def drain(self) -> None:
        """Reads what write would send, and sends nothing: a dry run of a lazy batch."""
        for _, data in self.copies:
            if not isinstance(data, str) and not callable(data):
                for _ in data:
                    pass
