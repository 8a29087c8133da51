"""Fast paths for MLflow's logging calls under a ``trackd:`` URI.

MLflow's fluent ``log_metric`` builds an ``MlflowClient`` (twice in MLflow 3), resolves the
tracking and registry URIs, looks for a Spark session and wraps the point in entities before it
reaches the store: 40-120 µs a call, where the store itself needs a few. The wrappers installed
here take the common calls straight to the store's shim client, with the result MLflow's path
gives -- the same rows, the same return value, rejections raised at the next read as before:

- ``mlflow.log_metric`` and ``mlflow.log_metrics``: the active run of this thread, no
  ``run_id``, ``model_id`` or ``dataset``, float or int values, int step and timestamp
  (``timestamp or now``, ``step or 0``, as MLflow's fluent API);
- ``mlflow.log_param(s)`` and ``mlflow.set_tag(s)``: the active run, keys MLflow accepts, values
  whose ``str()`` is within MLflow's length limit (so nothing is truncated), a param this
  process has not logged with another value, no ``mlflow.`` system tag; ``log_param`` returns
  the value, the others None, as MLflow's synchronous calls;
- ``MlflowClient.log_metric`` and ``MlflowClient.log_batch`` (PyTorch Lightning's logger calls
  the latter): a client whose tracking URI names a trackd store, a run id MLflow accepts, no
  model id, dataset or active model, float or int values, int steps and timestamps
  (``MlflowClient`` keeps a timestamp of 0 as 0: that call goes to MLflow); ``log_batch`` with
  metrics only.

Every call must also be synchronous (``synchronous`` None with MLFLOW_ENABLE_ASYNC_LOGGING off,
or True). Every other call goes to MLflow's own function unchanged, so its checks, messages,
auto-started runs, async logging and logged-model handling stay MLflow's. MLflow 3's usage
telemetry does not count the calls taken here.

``TRACKD_MLFLOW_FAST_PATH=0`` turns the wrappers off (read once, when the first trackd store
is made).
"""
from __future__ import annotations

import functools
import inspect
import os

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric
from mlflow.tracking import fluent
from mlflow.tracking._tracking_service import utils as tracking_utils
from mlflow.utils import validation
from mlflow.utils.time import get_current_time_millis

from . import mlflow_compat as compat

SWITCH_ENV = "TRACKD_MLFLOW_FAST_PATH"
_ASYNC_ENV = "MLFLOW_ENABLE_ASYNC_LOGGING"
_URI_ENV = "MLFLOW_TRACKING_URI"
_INT64_MAX = 2**63 - 1
_INT64_MIN = -2**63
_EXACT_INT = 2**53  # ints a float holds exactly: MLflow's log_batch converts none in 2.x
_KEYS_MAX = 65536  # keys remembered as valid, per kind; a set starts over beyond
# MLflow's limits (mlflow/utils/validation.py): longer values are truncated or refused there,
# and MLflow's chunks for one log_batch call; None (no fast path) if a release lacks one.
_PARAM_MAX = getattr(validation, "MAX_PARAM_VAL_LENGTH", None)
_TAG_MAX = getattr(validation, "MAX_TAG_VAL_LENGTH", None)
_BATCH_MAX = min(getattr(validation, "MAX_PARAMS_TAGS_PER_BATCH", 0),
                 getattr(validation, "MAX_METRICS_PER_BATCH", 0))

def _env_reader(name):
    """A function returning os.environ.get(name), reading os.environ's own mapping when it is
    the plain dict of bytes CPython keeps on POSIX (what os.environ.get reads, without encoding
    the key each call: MLflow reads these variables at every call, and so must we)."""
    data = getattr(os.environ, "_data", None)
    encode = getattr(os.environ, "encodekey", None)
    decode = getattr(os.environ, "decodevalue", None)
    if os.name != "posix" or type(data) is not dict or encode is None or decode is None:  # noqa
        return lambda: os.environ.get(name)
    key = encode(name)
    last = [None, None]  # the raw value last seen and its decoding

    def read():
        raw = data.get(key)
        if raw is None:
            return None
        if raw is not last[0]:
            last[0], last[1] = raw, decode(raw)
        return last[1]
    return read


_uri_env = _env_reader(_URI_ENV)
_async_env = _env_reader(_ASYNC_ENV)

# The active run stack: one list for every thread before MLflow 2.22, a ThreadLocalVariable
# (one list per thread) from 2.22 on.
_stack = fluent._active_run_stack  # pylint: disable=protected-access
_stack_of_thread = _stack.get if hasattr(_stack, "get") else (lambda: _stack)
# MLflow 3's active model (set_active_model, MLFLOW_ACTIVE_MODEL_ID); MLflow 2 has none.
_active_model_id = getattr(fluent, "get_active_model_id", lambda: None)


class _Stores:
    """Which store each tracking URI names, resolved by MLflow once per URI and again whenever
    a trackd store is made (MLflow may have replaced the one it caches)."""

    def __init__(self):
        self.uri = None  # the last URI asked for, and its answer: the common case is one URI
        self.store = None
        self.known = {}  # uri -> the TrackdStore for it, or None when it is not trackd's

    def store_for(self, uri):
        """The TrackdStore MLflow uses for uri, or None."""
        if uri is self.uri or uri == self.uri:
            return self.store
        if uri not in self.known:
            from .mlflow_store import TrackdStore

            try:
                store = tracking_utils._get_store(uri)  # pylint: disable=protected-access
            except Exception:  # pylint: disable=broad-except -- MLflow's path raises it again
                return None
            if len(self.known) >= 64:
                self.known.clear()
            self.known[uri] = store if isinstance(store, TrackdStore) else None
        self.uri, self.store = uri, self.known[uri]
        return self.store

    def forget(self):
        self.uri = None
        self.store = None
        self.known.clear()


class _Names:
    """Names MLflow's check accepted (check(name) returns without raising), remembered."""

    def __init__(self, check):
        self.check = check
        self.valid: set[str] = set()

    def ok(self, name) -> bool:
        if type(name) is not str:  # noqa: E721 -- exactly str (hashable, and as the set holds)
            return False
        if name in self.valid:
            return True
        try:
            self.check(name)
        except Exception:  # pylint: disable=broad-except -- MLflow's own path raises it again
            return False
        if len(self.valid) >= _KEYS_MAX:
            self.valid.clear()
        self.valid.add(name)
        return True


_stores = _Stores()
# As MLflow's _validate_metric, _validate_param, _validate_tag and _validate_run_id: the name
# rules and lengths (the value, step and time are checked by the caller).
_metric_keys = _Names(lambda k: compat._validate_metric(k, 0.0, 0, 0))
_param_keys = _Names(lambda k: compat._validate_param(k, ""))
_tag_keys = _Names(lambda k: compat._validate_tag(k, ""))
_run_ids = _Names(compat._validate_run_id)
_installed = False


def _step_ts(step, timestamp, zero_is_now=True):
    """(step, timestamp) as the store takes them -- MLflow's `step or 0` and, in the fluent API,
    `timestamp or now` (None: the shim stamps it) -- or None when MLflow's own path must look at
    them. MlflowClient keeps a timestamp of 0 (zero_is_now False): that goes to MLflow."""
    if step is None:
        step = 0
    elif type(step) is not int or not _INT64_MIN <= step <= _INT64_MAX:  # noqa: E721
        return None
    if timestamp is None or (zero_is_now and type(timestamp) is int and timestamp == 0):  # noqa
        timestamp = None  # no truth test on other types: MLflow's path meets them first
    elif type(timestamp) is not int or not 0 < timestamp <= _INT64_MAX:  # noqa: E721
        return None
    return step, timestamp


def _synchronous(synchronous, rest, kwargs, names) -> bool:
    """True when MLflow would log synchronously (synchronous None with async logging off, or
    True: MLflow reads any other value as asynchronous) and no other argument asks for MLflow's
    path: none beyond the known ones, and no keyword but the None values of those this MLflow's
    function takes (names)."""
    if rest or (synchronous is not None and synchronous is not True):
        return False
    if kwargs and any(v is not None or k not in names for k, v in kwargs.items()):
        return False
    if synchronous is None:
        a = _async_env()
        if a is not None and a.lower() not in ("false", "0"):
            return False
    return True


def _target(synchronous, run_id, rest, kwargs, names):
    """(store, run id) when a fluent call may take the fast path as far as its context goes:
    the tracking URI names a trackd store; no run_id; synchronous as _synchronous; and a run
    active on this thread with no logged model outputs and no active model. Else None."""
    uri = tracking_utils._tracking_uri or _uri_env()  # as get_tracking_uri
    store = _stores.store_for(uri) if uri else None
    if store is None or run_id is not None or not _synchronous(synchronous, rest, kwargs, names):
        return None
    stack = _stack_of_thread()
    if not stack or _active_model_id() is not None:
        return None
    run = stack[-1]
    outputs = getattr(run, "outputs", None)  # MLflow 3: metrics of the run's logged models
    if outputs is not None and outputs.model_outputs:
        return None
    return store, run.info.run_id


def _client_store(client, run_id, synchronous, rest, kwargs, names):
    """The TrackdStore an MlflowClient call may take the fast path to: the client's tracking
    URI names one, run_id is one MLflow accepts, the call is synchronous (_synchronous) and no
    model is active. Else None."""
    tracking = getattr(client, "_tracking_client", None)
    uri = getattr(tracking, "tracking_uri", None)
    store = _stores.store_for(uri) if uri else None
    if (store is None or not _synchronous(synchronous, rest, kwargs, names)
            or _active_model_id() is not None or not _run_ids.ok(run_id)):
        return None
    return store


def _pairs(mapping, keys, limit):
    """[(key, str(value))] for a dict MLflow would log as it is -- 1 to _BATCH_MAX items, keys
    keys accepts, every str(value) within limit -- or None."""
    if type(mapping) is not dict or not 0 < len(mapping) <= _BATCH_MAX or limit is None:  # noqa
        return None
    out = []
    for k, v in mapping.items():
        s = v if type(v) is str else str(v)  # noqa: E721
        if len(s) > limit or not keys.ok(k):
            return None
        out.append((k, s))
    return out


def _keywords(fn) -> frozenset:
    """The keyword arguments fn takes."""
    return frozenset(inspect.signature(fn).parameters)


def _fast_log_metric(original):
    names = _keywords(original)

    @functools.wraps(original)
    def log_metric(key, value, step=None, synchronous=None, timestamp=None, run_id=None, *rest,
                   **kwargs):
        t = type(value)
        st = _step_ts(step, timestamp) if t is float or t is int else None
        target = _target(synchronous, run_id, rest, kwargs, names) if st is not None else None
        if target is None or not _metric_keys.ok(key):
            # bool, numpy, tensors, odd steps and times, another run or store: MLflow's way
            return original(key, value, step, synchronous, timestamp, run_id, *rest, **kwargs)
        target[0]._log_metric_fast(target[1], key, float(value), st[0], st[1])
        return None

    return log_metric


def _fast_log_metrics(original):
    names = _keywords(original)

    # MLflow 2 orders these arguments (metrics, step, synchronous, run_id, timestamp) too.
    @functools.wraps(original)
    def log_metrics(metrics, step=None, synchronous=None, run_id=None, timestamp=None, *rest,
                    **kwargs):
        st = _step_ts(step, timestamp) if type(metrics) is dict and metrics else None  # noqa
        target = _target(synchronous, run_id, rest, kwargs, names) if st is not None else None
        if target is not None:
            for k, v in metrics.items():
                t = type(v)
                if (t is not float and t is not int) or not _metric_keys.ok(k):
                    target = None
                    break
        if target is None:
            return original(metrics, step, synchronous, run_id, timestamp, *rest, **kwargs)
        # One time for the whole dict, as MLflow's (the shim would stamp each frame it fills).
        ts = st[1] if st[1] is not None else get_current_time_millis()
        target[0]._log_metrics_fast(target[1], metrics, st[0], ts)
        return None

    return log_metrics


def _param_pairs(params):
    return _pairs(params, _param_keys, _PARAM_MAX)


def _tag_pairs(tags):
    pairs = _pairs(tags, _tag_keys, _TAG_MAX)
    # mlflow.* system tags (mlflow.runName renames the run, ...): MLflow's path.
    if pairs is not None and any(k.startswith("mlflow.") for k, _ in pairs):
        return None
    return pairs


def _send_params(store, run_id, pairs):
    return store._log_params_fast(run_id, pairs)


def _send_tags(store, run_id, pairs):
    store._set_tags_fast(run_id, pairs)
    return True


def _fast_one(pairs_of, send, returns_value):
    """A wrapper maker for log_param and set_tag (key, value, synchronous=None): the call is
    taken as the dict {key: value}; pairs_of gives its pairs or None (MLflow's path), send
    hands them to the store or returns False (MLflow's path). MLflow's synchronous log_param
    returns the value, set_tag None (returns_value)."""
    def make(original):
        names = _keywords(original)

        @functools.wraps(original)
        def one(key, value, synchronous=None, *rest, **kwargs):
            target = _target(synchronous, None, rest, kwargs, names)
            pairs = pairs_of({key: value}) if target is not None else None
            if pairs is None or not send(target[0], target[1], pairs):
                return original(key, value, synchronous, *rest, **kwargs)
            return value if returns_value else None

        return one
    return make


def _fast_many(pairs_of, send):
    """The same for log_params and set_tags (a dict, synchronous=None; MLflow 2.17 to 3.17 add
    run_id after synchronous to log_params), which return None."""
    def make(original):
        names = _keywords(original)

        @functools.wraps(original)
        def many(mapping, synchronous=None, *rest, **kwargs):
            target = _target(synchronous, None, rest, kwargs, names)
            pairs = pairs_of(mapping) if target is not None else None
            if pairs is None or not send(target[0], target[1], pairs):
                return original(mapping, synchronous, *rest, **kwargs)
            return None

        return many
    return make


def _fast_client_log_metric(original):
    names = _keywords(original)

    @functools.wraps(original)
    def log_metric(self, run_id, key, value, timestamp=None, step=None, synchronous=None, *rest,
                   **kwargs):
        t = type(value)
        st = _step_ts(step, timestamp, False) if t is float or t is int else None
        store = (_client_store(self, run_id, synchronous, rest, kwargs, names)
                 if st is not None else None)
        if store is None or not _metric_keys.ok(key):
            return original(self, run_id, key, value, timestamp, step, synchronous, *rest,
                            **kwargs)
        store._log_metric_fast(run_id, key, float(value), st[0], st[1])
        return None

    return log_metric


def _batch_rows(metrics):
    """[(key, value, timestamp, step)] for a non-empty list of metrics MLflow would log as they
    are -- plain Metric entities with valid keys, float values (or ints a float holds
    exactly), int64 steps, timestamps from 0 (MLflow's _validate_metric refuses negative
    ones), no model id, dataset or run id -- or None."""
    if type(metrics) is not list or not metrics:  # noqa: E721
        return None
    rows = []
    for m in metrics:
        if type(m) is not Metric:  # noqa: E721
            return None
        v, ts, step = m.value, m.timestamp, m.step
        t = type(v)
        if t is int:
            if not -_EXACT_INT <= v <= _EXACT_INT:
                return None
            v = float(v)
        elif t is not float:
            return None
        if (type(ts) is not int or type(step) is not int  # noqa: E721
                or not 0 <= ts <= _INT64_MAX or not _INT64_MIN <= step <= _INT64_MAX
                or getattr(m, "model_id", None) is not None
                or getattr(m, "dataset_name", None) is not None
                or getattr(m, "dataset_digest", None) is not None
                or getattr(m, "run_id", None) is not None
                or not _metric_keys.ok(m.key)):
            return None
        rows.append((m.key, v, ts, step))
    return rows


def _fast_client_log_batch(original):
    names = _keywords(original)

    @functools.wraps(original)
    def log_batch(self, run_id, metrics=(), params=(), tags=(), synchronous=None, *rest,
                  **kwargs):
        rows = _batch_rows(metrics) if not params and not tags else None
        store = (_client_store(self, run_id, synchronous, rest, kwargs, names)
                 if rows is not None else None)
        if store is None:
            return original(self, run_id, metrics, params, tags, synchronous, *rest, **kwargs)
        store._log_batch_fast(run_id, rows)
        return None

    return log_batch


# (where, name, wrapper maker): mlflow's fluent functions (also re-exported by mlflow itself)
# and MlflowClient's methods.
_WRAPPERS = [
    (fluent, "log_metric", _fast_log_metric),
    (fluent, "log_metrics", _fast_log_metrics),
    (fluent, "log_param", _fast_one(_param_pairs, _send_params, True)),
    (fluent, "log_params", _fast_many(_param_pairs, _send_params)),
    (fluent, "set_tag", _fast_one(_tag_pairs, _send_tags, False)),
    (fluent, "set_tags", _fast_many(_tag_pairs, _send_tags)),
    (MlflowClient, "log_metric", _fast_client_log_metric),
    (MlflowClient, "log_batch", _fast_client_log_batch),
]


def _wrap(where, name, make):
    original = getattr(where, name)
    wrapped = make(original)
    wrapped.__trackd_original__ = original
    setattr(where, name, wrapped)
    if where is fluent and getattr(mlflow, name, None) is original:
        setattr(mlflow, name, wrapped)


def store_made():
    """Called by every new TrackdStore: installs the wrappers once per process (unless
    TRACKD_MLFLOW_FAST_PATH=0), and makes the next call resolve its store again."""
    global _installed  # pylint: disable=global-statement
    _stores.forget()
    if _installed or os.environ.get(SWITCH_ENV, "1") in ("0", "false", "False", "no"):
        return
    _installed = True
    for where, name, make in _WRAPPERS:
        _wrap(where, name, make)
