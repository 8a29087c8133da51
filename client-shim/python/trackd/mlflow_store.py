"""MLflow tracking-store plugin: ``mlflow.set_tracking_uri("trackd:")``.

Writes go through the local trackd agent: the call encodes the event into the shim's
buffer and returns, and the agent commits it to the MLflow database in batches. Everything
else, reads first of all, is served by MLflow's own SqlAlchemyStore on the same database,
after a flush barrier, so a process always reads its own writes.

URIs: ``trackd:`` (the socket from TRACKD_SOCKET, else /run/trackd/trackd.sock) or
``trackd:///abs/path/to/socket``. The database to read from is ``TRACKD_BACKEND_URI`` when
set, else the URI the agent announces (``[mlflow] backend_uri`` in its configuration).
Passwords never travel that way: the process authenticates with its own ~/.pgpass or
PGPASSWORD, as libpq and psycopg do.
"""
from __future__ import annotations

import functools
import getpass
import importlib.util
import logging
import numbers
import os
import sys
import threading
import uuid
from urllib.parse import urlparse

from mlflow.entities import Run, RunData, RunInfo, RunInputs, RunStatus, RunTag
from mlflow.entities.lifecycle_stage import LifecycleStage
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import (
    INVALID_PARAMETER_VALUE,
    INVALID_STATE,
    PERMISSION_DENIED,
    RESOURCE_ALREADY_EXISTS,
    RESOURCE_DOES_NOT_EXIST,
)
from mlflow.store.artifact.artifact_repo import ArtifactRepository, verify_artifact_path
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME, MLFLOW_USER
from mlflow.utils.time import get_current_time_millis
from mlflow.utils.uri import append_to_uri_path, resolve_uri_if_local

from . import _trackd
from . import mlflow_compat as compat
from . import mlflow_fast

_log = logging.getLogger("trackd")

BACKEND_ENV = "TRACKD_BACKEND_URI"
FLUSH_TIMEOUT_ENV = "TRACKD_FLUSH_TIMEOUT"
# The agent's RUN_NOT_FOUND (proto/PROTOCOL.md) is MLflow's RESOURCE_DOES_NOT_EXIST and its
# FORBIDDEN (another user's run, a destination outside the roots) is PERMISSION_DENIED, as
# MLflow's authenticated server answers; every other rejection is INVALID_PARAMETER_VALUE
# there too.
_ERR_RUN_NOT_FOUND = 24
_ERR_FORBIDDEN = 26
_ERROR_CODES = {_ERR_RUN_NOT_FOUND: RESOURCE_DOES_NOT_EXIST, _ERR_FORBIDDEN: PERMISSION_DENIED}
DEFAULT_ARTIFACT_ROOT = "./mlruns"


def _socket_from_uri(store_uri: str) -> str | None:
    rest = store_uri[len("trackd:"):] if store_uri.startswith("trackd:") else store_uri
    if not rest:
        return None
    parsed = urlparse("trackd:" + rest)
    if parsed.netloc:
        raise MlflowException(
            f"trackd tracking URI {store_uri!r}: use trackd: or trackd:///absolute/socket/path",
            INVALID_PARAMETER_VALUE)
    return parsed.path or None


def _mask(uri: str) -> str:
    p = urlparse(uri)
    if p.password:
        return uri.replace(f":{p.password}@", ":****@")
    return uri


def _note_missing_pyspark():
    """MLflow looks for an active Spark session each time it builds a client, which
    mlflow.log_metric does twice per call. Without pyspark that is a failed import: a full
    sys.path search every time, most of the fluent call's cost once writes no longer wait
    for the database. Recording the absence once makes those imports fail at once; when
    pyspark is installed nothing changes."""
    if "pyspark" not in sys.modules and importlib.util.find_spec("pyspark") is None:
        sys.modules["pyspark"] = None


def _as_int(x) -> int:
    """A step or timestamp as the database stores it. MLflow accepts any number there and
    SqlAlchemyStore hands a float to PostgreSQL's bigint column, which rounds it half to even
    (the float8-to-int8 cast); Python's round() follows the same rule."""
    if isinstance(x, numbers.Integral):
        return int(x)
    return int(round(float(x)))


def _check_run_id(run_id):
    """Raises MLflow's "Run with id=... not found" (RESOURCE_DOES_NOT_EXIST) for a run id of a
    form MLflow never makes, as SqlAlchemyStore's single-entity writes (log_metric, log_param,
    set_tag, delete_tag, update_run_info), which look the run up without checking the form;
    only log_batch checks it (_validate_run_id) and says so."""
    try:
        compat._validate_run_id(run_id)
    except Exception:  # pylint: disable=broad-except -- a TypeError for a non-str too
        raise MlflowException(f"Run with id={run_id} not found",
                              RESOURCE_DOES_NOT_EXIST) from None


def backend_uri(store_uri: str | None) -> str:
    """The database MLflow's reads are served from: TRACKD_BACKEND_URI, else what the agent
    behind store_uri announces."""
    uri = os.environ.get(BACKEND_ENV)
    if not uri:
        client = _trackd.Client(socket=_socket_from_uri(store_uri or "trackd:"), source_name="",
                                source_type="", context_tags=False)
        try:
            uri = client.backend_uri(timeout=10.0)
        finally:
            client.close(timeout=0)
    if not uri:
        raise MlflowException(
            "trackd: no database to serve MLflow's reads from. Set TRACKD_BACKEND_URI "
            "(e.g. postgresql://user@host/db) or [mlflow] backend_uri in the agent's "
            "configuration", INVALID_STATE)
    if urlparse(uri).scheme == "trackd":
        raise MlflowException(f"{BACKEND_ENV} must name the database, not trackd:")
    return uri


def registry_store(store_uri: str | None = None):
    """MLflow's model registry store on the database the agent writes."""
    from mlflow.store.model_registry.sqlalchemy_store import SqlAlchemyStore as RegistryStore

    return RegistryStore(backend_uri(store_uri))


class TrackdStore(SqlAlchemyStore):
    """MLflow's SqlAlchemyStore with its write path replaced by the trackd agent."""

    def __init__(self, store_uri: str | None = None, artifact_uri: str | None = None):
        _note_missing_pyspark()
        self._socket = _socket_from_uri(store_uri or "trackd:")
        self._lock = threading.Lock()
        self._pid = None
        self._client_obj = None
        self._experiment_names: dict[str, str] = {}
        # Params this process logged, per run: a changed value is refused at the call, as
        # MLflow refuses it there (the agent checks again against the database).
        self._params: dict[str, dict[str, str]] = {}
        self._dirty = False  # writes sent since the last barrier
        self._pending: list = []  # rejections taken from the client, not raised yet
        self._flush_timeout = float(os.environ.get(FLUSH_TIMEOUT_ENV, "30"))
        backend = os.environ.get(BACKEND_ENV) or self._client().backend_uri(timeout=10.0)
        if not backend:
            backend = backend_uri(store_uri)  # raises with the explanation
        if urlparse(backend).scheme == "trackd":
            raise MlflowException(f"{BACKEND_ENV} must name the database, not trackd:")
        _log.debug("trackd: reads from %s", _mask(backend))
        super().__init__(backend, artifact_uri or DEFAULT_ARTIFACT_ROOT)
        mlflow_fast.store_made()

    # ---- the agent connection ------------------------------------------------

    def _client(self) -> _trackd.Client:
        """The shim client of this process; a forked child makes its own."""
        pid = os.getpid()
        if self._client_obj is None or self._pid != pid:
            with self._lock:
                if self._client_obj is None or self._pid != pid:
                    # mlflow.source.* tags come from MLflow's own context, not the shim.
                    self._client_obj = _trackd.Client(socket=self._socket, source_name="",
                                                      source_type="", context_tags=False)
                    self._pid = pid
        return self._client_obj

    def _timeout_error(self):
        return MlflowException(
            f"trackd: the agent did not commit this process's writes within "
            f"{self._flush_timeout:g} s ({FLUSH_TIMEOUT_ENV}); is it running and is the "
            "database reachable? See `trackd stats`.", INVALID_STATE)

    def _barrier(self):
        """Waits until every write this process made is committed, then raises what the
        agent rejected, as MLflow would have raised it at the call."""
        client = self._client()
        # Cleared before the flush: a write racing with it marks the store dirty again.
        dirty, self._dirty = self._dirty, False
        if dirty and not client.flush(self._flush_timeout):
            self._dirty = True
            raise self._timeout_error()
        errors, self._pending = self._pending + client.errors(), []
        if errors:
            for _, code, message in errors:
                _log.warning("trackd: agent rejected an event (code %d): %s", code, message)
            code = _ERROR_CODES.get(errors[0][1], INVALID_PARAMETER_VALUE)
            # One sentence per distinct rejection: a batch to a deleted run is one error.
            raise MlflowException("; ".join(dict.fromkeys(m for _, _, m in errors)), code)

    # ---- artifacts -------------------------------------------------------------

    def _route_artifacts(self, run_id, artifact_uri):
        """Sends MLflow's log_artifact(s) for run_id through the agent. MLflow's tracking
        client looks a run's artifact repository up in a per-process cache before building
        one (mlflow.tracking._tracking_service.utils._artifact_repos_cache in the pinned
        release); the agent's repository goes there. It builds the repository MLflow would
        use only when a read needs it: starting a run never needs one, whatever the scheme
        of the experiment's artifact location (mlflow-artifacts: needs an http tracking URI
        to build, which trackd: is not)."""
        cache = compat.artifact_repos_cache()
        if cache is None:
            _log.debug("trackd: this MLflow has no artifact repository cache; artifacts are "
                       "uploaded by MLflow itself")
            return
        if not isinstance(cache.get(run_id), AgentArtifactRepository):
            cache[run_id] = AgentArtifactRepository(self, run_id, artifact_uri)

    def get_run(self, run_id):
        self._barrier()
        run = super().get_run(run_id)
        self._route_artifacts(run_id, run.info.artifact_uri)
        return run

    # ---- experiments ---------------------------------------------------------

    def create_experiment(self, name, artifact_location=None, tags=None):
        compat._validate_experiment_name(name)
        if artifact_location:
            artifact_location = resolve_uri_if_local(artifact_location)
            compat._validate_experiment_artifact_location_length(artifact_location)
        self._barrier()
        if super().get_experiment_by_name(name) is not None:
            raise MlflowException(f"Experiment(name={name}) already exists.",
                                  RESOURCE_ALREADY_EXISTS)
        self._dirty = True
        self._client().create_experiment(name, artifact_location or None)
        self._barrier()
        experiment = super().get_experiment_by_name(name)
        if experiment is None:
            raise MlflowException(f"trackd: experiment {name!r} was not created", INVALID_STATE)
        for tag in tags or []:
            super().set_experiment_tag(experiment.experiment_id, tag)
        return experiment.experiment_id

    def _experiment_name(self, experiment_id):
        name = self._experiment_names.get(str(experiment_id))
        if name is None:
            experiment = self.get_experiment(experiment_id)
            if experiment.lifecycle_stage != LifecycleStage.ACTIVE:
                raise MlflowException(
                    f"The experiment {experiment_id} must be in the 'active' state. "
                    f"Current state is {experiment.lifecycle_stage}.", INVALID_PARAMETER_VALUE)
            name = experiment.name
            self._experiment_names[str(experiment_id)] = name
        return name

    # ---- runs ---------------------------------------------------------------

    def create_run(self, experiment_id, user_id, start_time, tags, run_name):
        name = self._experiment_name(experiment_id)
        experiment = self.get_experiment(experiment_id)
        tags = list(tags or [])
        tag_name = next((t.value for t in tags if t.key == MLFLOW_RUN_NAME), None)
        if run_name and tag_name and run_name != tag_name:
            raise MlflowException(
                "Both 'run_name' argument and 'mlflow.runName' tag are specified, but with "
                f"different values (run_name='{run_name}', mlflow.runName='{tag_name}').",
                INVALID_PARAMETER_VALUE)
        run_name = run_name or tag_name or compat._generate_random_name()
        if not tag_name:
            tags.append(RunTag(MLFLOW_RUN_NAME, run_name))
        run_id = uuid.uuid4().hex
        start_time = start_time if start_time is not None else get_current_time_millis()
        self._dirty = True
        # By id, as MLflow's create_run: the run goes to this experiment even if it was
        # renamed and another now has its name; the name is for the agent's messages.
        exp_id = int(experiment_id) if str(experiment_id).isdigit() else None
        self._client().start_run(run_id, name, run_name, start_time,
                                 {t.key: str(t.value) for t in tags}, experiment_id=exp_id)
        # The agent records the user the socket names; so does the returned entity.
        user = getpass.getuser()
        tags = [t for t in tags if t.key != MLFLOW_USER] + [RunTag(MLFLOW_USER, user)]
        # The first seven positionally: MLflow 2.x names the first one run_uuid, 3.x run_id.
        info = RunInfo(run_id, str(experiment_id), user,
                       RunStatus.to_string(RunStatus.RUNNING), start_time, None,
                       LifecycleStage.ACTIVE,
                       artifact_uri=append_to_uri_path(experiment.artifact_location, run_id,
                                                       SqlAlchemyStore.ARTIFACTS_FOLDER_NAME),
                       run_name=run_name)
        self._route_artifacts(run_id, info.artifact_uri)
        return Run(info, RunData(tags=tags), RunInputs(dataset_inputs=[]))

    def update_run_info(self, run_id, run_status, end_time, run_name):
        """Ends or renames a run. The end event is always sent, before anything can raise,
        so no run is left RUNNING. When the agent has rejected events of this process that
        were not raised yet, a FINISHED run ends FAILED instead, as it would have under
        MLflow, where the rejected call raised inside the run; then the rejection is raised."""
        _check_run_id(run_id)
        client = self._client()
        flushed = True
        if run_status == RunStatus.FINISHED and self._dirty:
            # Let the agent answer what is in flight, within the barrier's bound; whatever
            # it rejected is then known before the status is chosen.
            flushed = client.flush(self._flush_timeout)
            self._pending = self._pending + client.errors()
            if self._pending:
                run_status = RunStatus.FAILED
        status = RunStatus.to_string(run_status) if run_status is not None else None
        self._dirty = True
        client.update_run(run_id, status=status, end_time=end_time, run_name=run_name or None)
        if end_time is not None:
            self._params.pop(run_id, None)
        if not flushed:
            raise self._timeout_error()  # the bound is spent; the end is on its way
        self._barrier()
        return super().get_run(run_id).info

    # ---- the training-loop calls ------------------------------------------------

    def log_batch(self, run_id, metrics, params, tags):
        compat._validate_run_id(run_id)
        metrics, params, tags = compat._validate_batch_log_data(metrics, params, tags)
        compat._validate_batch_log_limits(metrics, params, tags)
        compat._validate_param_keys_unique(params)
        self._check_params(run_id, params)
        self._send(run_id, metrics, params, tags)

    def _send(self, run_id, metrics, params, tags):
        """Hands validated entities to the agent. Metrics of an MLflow 3 logged model (a
        model_id, given or from the active model) are written by MLflow's own store, after the
        barrier, into metrics and logged_model_metrics as MLflow writes them: the agent does
        not carry model ids yet, and losing them is worse than a synchronous call."""
        model_metrics = [m for m in metrics if getattr(m, "model_id", None)]
        if model_metrics:
            self._barrier()
            SqlAlchemyStore.log_batch(self, run_id, model_metrics, [], [])
            metrics = [m for m in metrics if not getattr(m, "model_id", None)]
        self._dirty = True
        ok = self._client().log_batch(
            run_id,
            [(m.key, m.value, _as_int(m.timestamp), _as_int(m.step)) for m in metrics],
            [(p.key, str(p.value)) for p in params],
            [(t.key, str(t.value)) for t in tags])
        if not ok:
            _log.warning("trackd: buffer full, %d events dropped (see trackd stats)",
                         len(metrics) + len(params) + len(tags))

    def _check_params(self, run_id, params, single=False):
        """Refuses params this process already logged on run_id with other values, with the
        message MLflow's SqlAlchemyStore gives (log_param's for one param, log_batch's
        otherwise); remembers the new ones. The agent checks again against the database."""
        if not params:
            return
        seen = self._params.setdefault(run_id, {})
        changed = [{"key": p.key, "old_value": seen[p.key], "new_value": str(p.value)}
                   for p in params if seen.get(p.key, str(p.value)) != str(p.value)]
        if changed and single:
            c = changed[0]
            raise MlflowException(
                f"Changing param values is not allowed. Param with key='{c['key']}' was already "
                f"logged with value='{c['old_value']}' for run ID='{run_id}'. Attempted logging "
                f"new value '{c['new_value']}'.", INVALID_PARAMETER_VALUE)
        if changed:
            raise MlflowException(
                f"Changing param values is not allowed. Params were already logged='{changed}' "
                f"for run ID='{run_id}'.", INVALID_PARAMETER_VALUE)
        for p in params:
            seen[p.key] = str(p.value)

    # One entity: MLflow's single-entity validation (SqlAlchemyStore.log_metric, log_param,
    # set_tag), whose messages name the field without a batch path.
    def log_metric(self, run_id, metric):
        _check_run_id(run_id)
        compat._validate_metric(metric.key, metric.value, metric.timestamp, metric.step)
        self._send(run_id, [metric], [], [])

    def _log_metric_fast(self, run_id, key, value, step, timestamp):
        """mlflow.log_metric's fast path (mlflow_fast): run_id is the active run's, key one MLflow
        accepted, value a float, step an int64, timestamp epoch ms > 0 or None for now."""
        self._dirty = True
        if not self._client().log_metric(run_id, key, value, step, timestamp):
            _log.warning("trackd: buffer full, 1 event dropped (see trackd stats)")

    def _log_metrics_fast(self, run_id, metrics, step, timestamp):
        """mlflow.log_metrics' fast path: metrics a non-empty {key: float or int} of keys MLflow
        accepted, one step and timestamp as for _log_metric_fast."""
        self._dirty = True
        if not self._client().log_metrics(run_id, metrics, step, timestamp):
            _log.warning("trackd: buffer full, %d events dropped (see trackd stats)", len(metrics))

    def _log_batch_fast(self, run_id, rows):
        """MlflowClient.log_batch's fast path: rows a non-empty list of (key, value, timestamp,
        step) that MLflow would accept as they are (valid keys, float values, int64 steps and
        timestamps), on a run id MLflow accepts; no params, tags, model ids or datasets."""
        self._dirty = True
        if not self._client().log_batch(run_id, rows, [], []):
            _log.warning("trackd: buffer full, %d events dropped (see trackd stats)", len(rows))

    def _log_params_fast(self, run_id, params):
        """mlflow.log_param(s)' fast path: params a non-empty list of (key, value) with keys
        MLflow accepted and values already str and within MLflow's length limit. Returns False,
        sending nothing, when this process logged another value for one of the keys on run_id
        (MLflow's path then raises its error, as _check_params)."""
        seen = self._params.setdefault(run_id, {})
        for key, value in params:
            old = seen.get(key)
            if old is not None and old != value:
                return False
        for key, value in params:
            seen[key] = value
        self._dirty = True
        if not self._client().log_params(run_id, params):
            _log.warning("trackd: buffer full, %d events dropped (see trackd stats)", len(params))
        return True

    def _set_tags_fast(self, run_id, tags):
        """mlflow.set_tag(s)' fast path: tags a non-empty list of (key, value) with keys MLflow
        accepted, no ``mlflow.`` system tag, values already str and within MLflow's limit."""
        self._dirty = True
        if not self._client().set_tags(run_id, tags):
            _log.warning("trackd: buffer full, %d events dropped (see trackd stats)", len(tags))

    def log_param(self, run_id, param):
        _check_run_id(run_id)
        param = compat._validate_param(param.key, param.value)
        self._check_params(run_id, [param], single=True)
        self._send(run_id, [], [param], [])

    def set_tag(self, run_id, tag):
        _check_run_id(run_id)
        tag = compat._validate_tag(tag.key, tag.value)
        self._send(run_id, [], [], [tag])

    def delete_tag(self, run_id, key):
        _check_run_id(run_id)
        compat._validate_tag_name(key)
        self._dirty = True
        self._client().delete_tag(run_id, key)

    def flush(self):
        """Commits everything logged so far (MLflow calls this before reads of its own)."""
        self._barrier()


class AgentArtifactRepository(ArtifactRepository):
    """A run's artifact repository whose uploads go through the agent: log_artifact hands
    the open file over and returns, the agent uploads it to the same place MLflow would.
    Reads (list, download) use the repository MLflow would use, built on first need, after
    the store's barrier, which also waits for this process's uploads."""

    def __init__(self, store, run_id, artifact_uri):
        self._inner_repo = None
        super().__init__(artifact_uri)
        self._store = store
        self._run_id = run_id

    @property
    def _inner(self):
        if self._inner_repo is None:
            self._inner_repo = get_artifact_repository(self.artifact_uri)
        return self._inner_repo

    def log_artifact(self, local_file, artifact_path=None):
        verify_artifact_path(artifact_path)  # MLflow's check and message, at the call
        self._store._dirty = True
        if not self._store._client().log_artifact(self._run_id, os.fspath(local_file),
                                                  artifact_path):
            raise MlflowException(
                f"trackd: the client buffer is full; {local_file} was not handed to the agent "
                "(see trackd stats)", INVALID_STATE)

    def log_artifacts(self, local_dir, artifact_path=None):
        verify_artifact_path(artifact_path)
        self._store._dirty = True
        self._store._client().log_artifacts(self._run_id, os.fspath(local_dir), artifact_path)

    def list_artifacts(self, path=None):
        self._store._barrier()
        return self._inner.list_artifacts(path)

    def download_artifacts(self, artifact_path, dst_path=None, **kwargs):
        self._store._barrier()
        return self._inner.download_artifacts(artifact_path, dst_path, **kwargs)

    def _download_file(self, remote_file_path, local_path):
        self._store._barrier()
        return self._inner._download_file(remote_file_path, local_path)

    def delete_artifacts(self, artifact_path=None):
        self._store._barrier()
        return self._inner.delete_artifacts(artifact_path)

    def create_multipart_upload(self, local_file, num_parts, artifact_path=None):
        return self._inner.create_multipart_upload(local_file, num_parts, artifact_path)

    def complete_multipart_upload(self, local_file, upload_id, parts=None, artifact_path=None):
        return self._inner.complete_multipart_upload(local_file, upload_id, parts, artifact_path)

    def abort_multipart_upload(self, local_file, upload_id, artifact_path=None):
        return self._inner.abort_multipart_upload(local_file, upload_id, artifact_path)

    def __getattr__(self, name):
        if name.startswith("__") or name == "_inner_repo":
            raise AttributeError(name)
        return getattr(self._inner, name)


# Every other public store method (reads, and writes the agent does not carry such as
# delete_run or set_experiment_tag) runs on MLflow's own store after the barrier, so it sees
# and orders after everything this process logged.
_OWN = {name for name, value in vars(TrackdStore).items() if callable(value)}
# The *_async writers queue into MLflow's own logging thread, which calls our log_batch.
# shut_down_async_logging runs in MlflowClient.set_terminated before the end event: a barrier
# there could raise and leave the run RUNNING.
_NO_BARRIER = {"log_batch_async", "log_metric_async", "log_param_async", "set_tag_async",
               "log_spans_async", "sanitize_metric_value", "shut_down_async_logging"}


def _after_barrier(method):
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        self._barrier()
        return method(self, *args, **kwargs)

    return wrapper


for _name in dir(SqlAlchemyStore):
    if _name.startswith("_") or _name in _OWN or _name in _NO_BARRIER:
        continue
    _attr = getattr(SqlAlchemyStore, _name)
    if callable(_attr) and not isinstance(_attr, type):
        setattr(TrackdStore, _name, _after_barrier(_attr))
