"""What an MLflow local store holds, read into plain objects that the PostgreSQL writer
(`target.py`) takes from either reader (`filestore.py`, `sqlitestore.py`).

Rules here follow MLflow 3.17.2's SQL store, the one that owns the target schema:
`sanitize` is `SqlAlchemyStore.sanitize_metric_value`, `latest_points` is
`_update_latest_metrics_if_necessary` applied to a whole history in log order.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Optional

#: `RunStatus` as MLflow's file store writes it (an int) to the name the SQL store keeps.
RUN_STATUS = {1: "RUNNING", 2: "SCHEDULED", 3: "FINISHED", 4: "FAILED", 5: "KILLED"}
#: `SourceType` ints of `mlflow.entities.SourceType`.
SOURCE_TYPE = {1: "NOTEBOOK", 2: "JOB", 3: "PROJECT", 4: "LOCAL", 1000: "UNKNOWN"}
#: PostgreSQL `integer`, the type of every experiment_id and version column.
INT4_MAX = 2**31 - 1
_MAX_FLOAT = 1.7976931348623157e308


def sanitize(value: float) -> tuple[float, bool]:
    """(stored value, is_nan) for a metric value, as MLflow's `sanitize_metric_value`:
    NaN is stored as 0 with is_nan, +-Inf as +-1.7976931348623157e308."""
    if math.isnan(value):
        return 0.0, True
    if math.isinf(value):
        return (_MAX_FLOAT if value > 0 else -_MAX_FLOAT), False
    return value, False


def dedupe(points: Iterable[tuple]) -> tuple[list[tuple], Optional[tuple], int]:
    """(distinct points in first-seen order, the latest point, duplicates dropped), for
    points (timestamp ms, step, stored value, is_nan) as both readers give them.

    Points are identical when their whole `metrics` primary key is, MLflow's
    `_log_metrics_once` rule. The latest is the first point in log order with the largest
    (step, timestamp, stored value), which is what MLflow's per-call update of
    `latest_metrics` leaves after the same calls."""
    seen: dict = {}
    best = None
    best_key = None
    n = 0
    for p in points:
        n += 1
        if p in seen:
            continue
        seen[p] = None
        k = (p[1], p[0], p[2])
        if best_key is None or k > best_key:
            best, best_key = p, k
    return list(seen), best, n - len(seen)


@dataclass
class Experiment:
    source_id: str
    name: str
    artifact_location: Optional[str]
    lifecycle_stage: str
    creation_time: Optional[int]
    last_update_time: Optional[int]
    tags: dict = field(default_factory=dict)
    where: str = ""  # the directory or table row, for messages


@dataclass
class Input:
    """One `inputs` row. A dataset input names its dataset by the reader's key for it,
    resolved to the dataset_uuid by the writer; tags go to `input_tags`."""
    source_type: str
    source_id: str
    destination_type: str
    destination_id: str
    step: int = 0
    dataset_key: Optional[tuple] = None
    tags: dict = field(default_factory=dict)


@dataclass
class Dataset:
    key: tuple  # the reader's identity for it: (experiment source id, dir name or uuid)
    experiment: str
    name: str
    digest: str
    source_type: str
    source: str
    schema: Optional[str]
    profile: Optional[str]
    uuid: Optional[str] = None  # kept from a SQL source; new for a file store


@dataclass
class Run:
    run_uuid: str
    experiment: str  # the source experiment id
    name: Optional[str]
    source_type: str
    source_name: str
    entry_point_name: str
    user_id: Optional[str]
    status: str
    start_time: Optional[int]
    end_time: Optional[int]
    deleted_time: Optional[int]
    source_version: str
    lifecycle_stage: str
    artifact_uri: Optional[str]
    params: dict = field(default_factory=dict)
    tags: dict = field(default_factory=dict)
    inputs: list = field(default_factory=list)
    #: metric key -> a callable giving that key's points in log order; the reader counts
    #: the lines it could not read into the Report it was given.
    metrics: dict = field(default_factory=dict)
    #: metric key -> latest point, when the source keeps MLflow's own latest_metrics
    latest: Optional[dict] = None
    where: str = ""
    size_hint: int = 0  # about how many metric points, to size transactions
    #: where the source keeps the run's files when its recorded artifact_uri is gone (a store
    #: copied from another machine): its directory in the store
    artifact_fallback: Optional[str] = None


@dataclass
class LoggedModel:
    model_id: str
    experiment: str
    name: str
    artifact_location: str
    creation_timestamp_ms: int
    last_updated_timestamp_ms: int
    status: int
    lifecycle_stage: str
    model_type: Optional[str]
    source_run_id: Optional[str]
    status_message: Optional[str]
    params: dict = field(default_factory=dict)
    tags: dict = field(default_factory=dict)
    #: (metric_name, timestamp ms, step, value or None, run_id, dataset_uuid, dataset_name,
    #: dataset_digest), in log order
    metrics: Callable[[], Iterator[tuple]] = lambda: iter(())
    where: str = ""
    artifact_fallback: Optional[str] = None  # as Run's


@dataclass
class ModelVersion:
    version: int
    creation_time: Optional[int]
    last_updated_time: Optional[int]
    description: Optional[str]
    user_id: Optional[str]
    current_stage: str
    source: Optional[str]
    run_id: Optional[str]
    status: str
    status_message: Optional[str]
    run_link: Optional[str]
    storage_location: Optional[str]
    tags: dict = field(default_factory=dict)


@dataclass
class RegisteredModel:
    name: str
    creation_time: Optional[int]
    last_updated_time: Optional[int]
    description: Optional[str]
    tags: dict = field(default_factory=dict)
    aliases: dict = field(default_factory=dict)  # alias -> version
    versions: list = field(default_factory=list)
    where: str = ""


class SourceError(Exception):
    """SOURCE cannot be imported at all (not a store, another schema revision...)."""


class Refused(Exception):
    """An entity that cannot go into PostgreSQL as it is; the message says why."""


class Report:
    """What the import did, counted by entity and outcome, and the messages that explain the
    entities it skipped or refused. Printed as the final summary."""

    def __init__(self, warn: Callable[[str], None]):
        self.counts: Counter = Counter()
        self.warn_sink = warn
        self.problems = 0  # refused or differing entities: the exit status says so
        self._said: Counter = Counter()

    def add(self, what: str, n: int = 1) -> None:
        self.counts[what] += n

    def warn(self, msg: str, kind: str = "") -> None:
        """A message for the operator; the first 20 of each kind are printed, then a count."""
        self._said[kind] += 1
        if self._said[kind] <= 20:
            self.warn_sink(msg)
        elif self._said[kind] == 21:
            self.warn_sink(f"(more like this are counted in the summary, not printed: {kind})")

    def refuse(self, what: str, msg: str) -> None:
        self.problems += 1
        self.add(f"{what} refused")
        self.warn(f"refused {msg}", what + " refused")
