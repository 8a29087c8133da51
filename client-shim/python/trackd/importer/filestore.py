"""Reads an MLflow file store (an `mlruns/` directory) as MLflow 2.x and 3.x write it.

The layout is MLflow's `FileStore` (mlflow/store/tracking/file_store.py) and, for the model
registry under `mlruns/models`, `FileStore` of mlflow/store/model_registry/file_store.py:

* `<exp>/meta.yaml`, `<exp>/tags/<key>`; deleted experiments live under `.trash/<exp>`.
* `<exp>/<run>/meta.yaml`, `params/<key>`, `tags/<key>` (raw values, no newline) and
  `metrics/<key>`, one line per logged point: `ts value step`, `ts value step dataset digest`
  or, in old stores, `ts value`. Keys with `/` are subdirectories.
* `<exp>/datasets/<md5>/meta.yaml`, `<run>/inputs/<md5>/meta.yaml`, `<run>/outputs/<model>/`.
* `<exp>/models/<model_id>/` for MLflow 3 logged models; metric lines carry the run id.
* `models/<name>/meta.yaml`, `tags/`, `aliases/<alias>` and `version-<n>/` for the registry.

Files are read as bytes and decoded as UTF-8, so values keep their exact bytes (no newline
translation). What MLflow itself cannot read back is skipped and counted, never fatal.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterator, Optional

import yaml

from .entities import (RUN_STATUS, SOURCE_TYPE, Dataset, Experiment, Input, LoggedModel,
                       ModelVersion, RegisteredModel, Refused, Report, Run, SourceError,
                       sanitize)

#: Subdirectories of an experiment that are not runs (FileStore.RESERVED_EXPERIMENT_FOLDERS).
RESERVED = {"tags", "datasets", "traces", "models"}
_NUMERIC = re.compile(r"^[0-9]+$")
_MAX = 1.7976931348623157e308
#: libyaml's safe loader when PyYAML was built with it (its wheels are): several times faster
#: on a store's thousands of meta.yaml files, and the same safe subset of YAML.
_SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def resolve_root(source: str) -> Optional[Path]:
    """The mlruns directory SOURCE names (a path or a file:// URI, as in MLFLOW_TRACKING_URI):
    SOURCE/mlruns when it exists, else SOURCE when it looks like one (a numeric experiment
    directory, `.trash` or `models`); else None."""
    if source.startswith("file://"):
        source = source[len("file://"):]
    p = Path(source)
    if (p / "mlruns").is_dir():
        p = p / "mlruns"
    if not p.is_dir():
        return None
    for child in p.iterdir():
        if child.is_dir() and (_NUMERIC.match(child.name) or child.name in (".trash", "models")):
            return p
    return None


def _text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise Refused(f"{path}: not UTF-8 ({e})") from None


def _yaml(path: Path) -> Optional[dict]:
    """meta.yaml as a dict; None when the file is missing or empty."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        meta = yaml.load(data, Loader=_SAFE_LOADER)
    except yaml.YAMLError as e:
        raise Refused(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if meta is None:
        return None
    if not isinstance(meta, dict):
        raise Refused(f"{path}: not a YAML mapping")
    return meta


def _files(folder: Path) -> dict:
    """{key: path} for every file under folder, the key being its relative POSIX path: keys
    with `/` are subdirectories, as FileStore._get_resource_files walks them."""
    out = {}
    if folder.is_dir():
        for dirpath, _dirs, files in os.walk(folder):
            for f in files:
                path = Path(dirpath) / f
                out[path.relative_to(folder).as_posix()] = path
    return out


def _key_files(folder: Path) -> dict:
    """{key: value} of a params/, tags/ or aliases/ folder: one file per key."""
    return {k: _text(p) for k, p in _files(folder).items()}


def _int(v) -> Optional[int]:
    if v is None or isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, str) and re.fullmatch(r"-?[0-9]+", v.strip()):
        return int(v)
    return None


def _number(field: bytes) -> int:
    """An int field of a metric line. MLflow's client accepts any number, so `1.0` appears;
    integral floats are taken, anything else raises ValueError."""
    try:
        return int(field)
    except ValueError:
        f = float(field)
        if f.is_integer():
            return int(f)
        raise


class FileStoreReader:
    """Iterates one mlruns directory's experiments, runs, logged models and registered
    models. Malformed entities are reported to `report` and skipped."""

    kind = "file store"

    def __init__(self, root: Path, report: Report):
        self.root = root
        self.report = report
        self._exp_dirs: dict = {}  # source experiment id -> directory
        self.no_meta = 0  # experiment directories without meta.yaml

    def describe(self) -> str:
        return f"MLflow file store {self.root}"

    def revision(self) -> Optional[str]:
        return None

    # ---- experiments -------------------------------------------------------------------

    def experiments(self) -> list:
        """Active experiments (numeric directories, in id order), then deleted ones (.trash)."""
        out = []
        for base in (self.root, self.root / ".trash"):
            if not base.is_dir():
                continue
            dirs = sorted((d for d in base.iterdir() if d.is_dir() and _NUMERIC.match(d.name)),
                          key=lambda d: int(d.name))
            for d in dirs:
                try:
                    e = self._experiment(d)
                except Refused as err:
                    self.report.refuse("experiments", f"experiment {d}: {err}")
                    continue
                if e is not None:
                    self._exp_dirs[e.source_id] = d
                    out.append(e)
        if not out and self.no_meta:
            # MLflow >= 3.7 logs into ./mlflow.db and keeps only artifacts in ./mlruns.
            near = [p / "mlflow.db" for p in (self.root.parent, Path.cwd())
                    if (p / "mlflow.db").is_file()]
            raise SourceError(
                f"{self.root} has experiment directories but no experiment in them (no "
                "meta.yaml): it looks like the artifact directory of a SQLite store, whose runs "
                "are in its mlflow.db. Import that: "
                + (f"trackd import sqlite:///{near[0].resolve()}" if near else
                   "trackd import sqlite:///PATH/TO/mlflow.db"))
        return out

    def _experiment(self, d: Path) -> Optional[Experiment]:
        meta = _yaml(d / "meta.yaml")
        if meta is None:
            self.no_meta += 1
            self.report.add("experiments skipped")
            self.report.warn(f"skipped {d}: no meta.yaml, so MLflow's file store does not read "
                             "it either (a SQLite store keeps only artifacts in such "
                             "directories)", "experiment without meta.yaml")
            return None
        if str(meta.get("experiment_id")) != d.name:
            self.report.add("experiments skipped")
            self.report.warn(f"skipped experiment {d}: its meta.yaml names experiment "
                             f"{meta.get('experiment_id')!r} (MLflow ignores it too)",
                             "experiment id mismatch")
            return None
        stage = meta.get("lifecycle_stage") or "active"
        if d.parent.name == ".trash":
            stage = "deleted"
        return Experiment(
            source_id=d.name, name=str(meta.get("name") or f"experiment_{d.name}"),
            artifact_location=meta.get("artifact_location"), lifecycle_stage=stage,
            creation_time=_int(meta.get("creation_time")),
            last_update_time=_int(meta.get("last_update_time")),
            tags=_key_files(d / "tags"), where=str(d))

    def count_runs(self, experiment: Experiment) -> int:
        d = self._exp_dirs[experiment.source_id]
        return sum(1 for r in d.iterdir() if r.name not in RESERVED and (r / "meta.yaml").is_file())

    def traces(self, experiment: Experiment) -> int:
        t = self._exp_dirs[experiment.source_id] / "traces"
        return sum(1 for _ in t.iterdir()) if t.is_dir() else 0

    # ---- datasets and runs -------------------------------------------------------------

    def _metas(self, base: Path, what: str) -> Iterator[tuple]:
        """(directory, its meta.yaml) for each subdirectory of base that has one, in name
        order; an unreadable meta.yaml refuses that entity (what) only."""
        if not base.is_dir():
            return
        for d in sorted(base.iterdir()):
            try:
                meta = _yaml(d / "meta.yaml")
            except Refused as err:
                self.report.refuse(what + "s", f"{what} {d}: {err}")
                continue
            if meta is not None:
                yield d, meta

    def datasets(self, experiment: Experiment) -> list:
        out = []
        base = self._exp_dirs[experiment.source_id] / "datasets"
        for d, meta in self._metas(base, "dataset"):
            out.append(Dataset(
                key=(experiment.source_id, d.name), experiment=experiment.source_id,
                name=str(meta.get("name")), digest=str(meta.get("digest")),
                source_type=str(meta.get("source_type")), source=str(meta.get("source")),
                schema=meta.get("schema"), profile=meta.get("profile")))
        return out

    def runs(self, experiment: Experiment) -> Iterator[Run]:
        d = self._exp_dirs[experiment.source_id]
        for r in sorted(d.iterdir()):
            if r.name in RESERVED or not r.is_dir() or not (r / "meta.yaml").is_file():
                continue
            try:
                run = self._run(experiment, r)
            except Refused as err:
                self.report.refuse("runs", f"run {r}: {err}")
                continue
            if run is not None:
                yield run

    def _run(self, experiment: Experiment, r: Path) -> Optional[Run]:
        meta = _yaml(r / "meta.yaml")
        if meta is None:
            self.report.add("runs skipped")
            self.report.warn(f"skipped run {r}: empty meta.yaml", "run without meta.yaml")
            return None
        run_id = str(meta.get("run_id") or meta.get("run_uuid") or "")
        if run_id != r.name or str(meta.get("experiment_id")) != experiment.source_id:
            self.report.add("runs skipped")
            self.report.warn(f"skipped run {r}: its meta.yaml names run {run_id!r} of experiment "
                             f"{meta.get('experiment_id')!r} (MLflow ignores it too)",
                             "run id mismatch")
            return None
        tags = _key_files(r / "tags")
        status = meta.get("status")
        status = RUN_STATUS.get(status, status) if isinstance(status, int) else str(status)
        if status not in RUN_STATUS.values():
            raise Refused(f"status {meta.get('status')!r} is not one of MLflow's run statuses")
        source_type = meta.get("source_type", 4)
        source_type = SOURCE_TYPE.get(source_type, "UNKNOWN") if isinstance(source_type, int) \
            else str(source_type)
        stage = meta.get("lifecycle_stage") or "active"
        deleted_time = _int(meta.get("deleted_time")) if "deleted_time" in meta else None
        run = Run(
            run_uuid=run_id, experiment=experiment.source_id,
            name=meta.get("run_name") or tags.get("mlflow.runName"),
            source_type=source_type, source_name=str(meta.get("source_name") or ""),
            entry_point_name=str(meta.get("entry_point_name") or ""),
            user_id=meta.get("user_id"), status=status,
            start_time=_int(meta.get("start_time")), end_time=_int(meta.get("end_time")),
            deleted_time=deleted_time, source_version=str(meta.get("source_version") or ""),
            lifecycle_stage=stage, artifact_uri=meta.get("artifact_uri"),
            params=_key_files(r / "params"), tags=tags, where=str(r),
            artifact_fallback=str(r / "artifacts"))
        for key, path in _files(r / "metrics").items():
            run.metrics[key] = (lambda path=path, key=key: self._run_points(run, key, path))
            run.size_hint += path.stat().st_size // 24  # "1700000000000 0.25 12\n"
        self._run_inputs(run, r)
        return run

    def _run_points(self, run: Run, key: str, path: Path) -> list:
        """(timestamp, step, stored value, is_nan) for each readable line of a metric file, in
        line order. Values are sanitized as MLflow's SQL store does (`sanitize`)."""
        out = []
        append = out.append
        bad = 0
        for line in path.read_bytes().split(b"\n"):
            f = line.split()
            n = len(f)
            try:
                if n == 3 or n == 5:
                    ts, step = int(f[0]), int(f[2])
                elif n == 0:
                    continue
                elif n == 2:
                    ts, step = int(f[0]), 0
                else:
                    raise ValueError
                v = float(f[1])
            except ValueError:
                try:  # integral floats (step=1.0) are what MLflow's client meant; others are not
                    ts, step, v = _number(f[0]), (_number(f[2]) if n != 2 else 0), float(f[1])
                except (ValueError, IndexError):
                    bad += 1
                    if bad == 1:
                        self.report.warn(f"skipped unreadable metric line in {path}: "
                                         f"{line[:120].decode('utf-8', 'replace')!r}",
                                         "unreadable metric line")
                    continue
            if -_MAX <= v <= _MAX:
                append((ts, step, v, False))
            else:
                v, nan = sanitize(v)
                append((ts, step, v, nan))
        if bad:
            self.report.add("metric lines unreadable", bad)
        return out

    def _run_inputs(self, run: Run, r: Path) -> None:
        for sub in ("inputs", "outputs"):
            for d, meta in self._metas(r / sub, "run input"):
                st = meta.get("source_type")
                if sub == "outputs":
                    # FileStore.log_outputs: the directory is the model id
                    run.inputs.append(Input("RUN_OUTPUT", run.run_uuid, "MODEL_OUTPUT", d.name,
                                            step=_int(meta.get("step")) or 0))
                elif st == "DATASET":
                    # destination_id repeats source_id in FileStore's files: the run is r
                    run.inputs.append(Input(
                        "DATASET", "", "RUN", run.run_uuid,
                        dataset_key=(run.experiment, str(meta.get("source_id"))),
                        tags={str(k): str(v) for k, v in (meta.get("tags") or {}).items()}))
                elif st == "MODEL":
                    run.inputs.append(Input("RUN_INPUT", run.run_uuid, "MODEL_INPUT",
                                            str(meta.get("source_id"))))

    # ---- logged models -----------------------------------------------------------------

    def logged_models(self, experiment: Experiment) -> Iterator[LoggedModel]:
        # A directory without meta.yaml holds metrics of a model of another experiment, which
        # FileStore leaves under the run's experiment: skipped, as MLflow reads none of it.
        base = self._exp_dirs[experiment.source_id] / "models"
        for d, meta in self._metas(base, "logged model"):
            try:
                status = int(meta.get("status") or 0)
            except (TypeError, ValueError):
                self.report.refuse("logged models", f"logged model {d}: status "
                                   f"{meta.get('status')!r} is not an integer")
                continue
            model = LoggedModel(
                model_id=str(meta.get("model_id") or d.name), experiment=experiment.source_id,
                name=str(meta.get("name")), artifact_location=str(meta.get("artifact_location")),
                creation_timestamp_ms=_int(meta.get("creation_timestamp")) or 0,
                last_updated_timestamp_ms=_int(meta.get("last_updated_timestamp")) or 0,
                status=status, lifecycle_stage=meta.get("lifecycle_stage") or "active",
                model_type=meta.get("model_type"), source_run_id=meta.get("source_run_id"),
                status_message=meta.get("status_message"), params=_key_files(d / "params"),
                tags=_key_files(d / "tags"), where=str(d), artifact_fallback=str(d / "artifacts"))
            files = _files(d / "metrics")
            model.metrics = lambda files=files: self._model_points(files)
            yield model

    def _model_points(self, files: dict) -> Iterator[tuple]:
        for name, path in files.items():
            bad = 0
            for line in path.read_bytes().split(b"\n"):
                f = line.split()
                if not f:
                    continue
                try:
                    if len(f) not in (4, 6):
                        raise ValueError
                    ts, step = _number(f[0]), _number(f[2])
                    value, _ = sanitize(float(f[1]))  # the table has no is_nan: as MLflow
                except ValueError:
                    bad += 1
                    continue
                dsname, digest = (f[4].decode(), f[5].decode()) if len(f) == 6 else (None, None)
                yield name, ts, step, value, f[3].decode(), None, dsname, digest
            if bad:
                self.report.add("metric lines unreadable", bad)

    # ---- model registry ----------------------------------------------------------------

    def registered_models(self) -> Iterator[RegisteredModel]:
        base = self.root / "models"
        if not base.is_dir():
            return
        for d in sorted(base.iterdir()):
            try:
                meta = _yaml(d / "meta.yaml")
                if meta is None:
                    continue
                rm = RegisteredModel(
                    name=str(meta.get("name") or d.name),
                    creation_time=_int(meta.get("creation_timestamp")),
                    last_updated_time=_int(meta.get("last_updated_timestamp")),
                    description=meta.get("description"), tags=_key_files(d / "tags"), where=str(d))
                for alias, v in _key_files(d / "aliases").items():
                    if _int(v) is not None:
                        rm.aliases[alias] = _int(v)
                for v in sorted(d.glob("version-*")):
                    vm = _yaml(v / "meta.yaml")
                    if vm is None or _int(vm.get("version")) is None:
                        continue
                    rm.versions.append(ModelVersion(
                        version=_int(vm.get("version")),
                        creation_time=_int(vm.get("creation_timestamp")),
                        last_updated_time=_int(vm.get("last_updated_timestamp")),
                        description=vm.get("description"), user_id=vm.get("user_id"),
                        current_stage=str(vm.get("current_stage") or "None"),
                        source=vm.get("source"), run_id=vm.get("run_id"),
                        status=str(vm.get("status") or "READY"),
                        status_message=vm.get("status_message"), run_link=vm.get("run_link"),
                        storage_location=vm.get("storage_location"),
                        tags=_key_files(v / "tags")))
            except Refused as err:
                self.report.refuse("registered models", f"registered model {d}: {err}")
                continue
            yield rm

    def skipped_tables(self) -> dict:
        return {}
