"""A fast path for ``mlflow.log_metric`` and ``mlflow.log_metrics`` under a ``trackd:`` URI.

MLflow's fluent ``log_metric`` builds an ``MlflowClient`` (twice in MLflow 3), resolves the
tracking and registry URIs, looks for a Spark session and wraps the point in entities before it
reaches the store: 40-120 µs a call, where the store itself needs a few. The wrappers installed
here take the common call -- the active run of this thread, no ``run_id``, ``model_id`` or
``dataset``, synchronous, float or int values, int step and timestamp, keys MLflow already
accepted -- straight to the store's shim client, with the same result MLflow's path gives:
the same row (``timestamp or now``, ``step or 0``, the value as a float), ``None`` returned,
and rejections raised at the next read as before. Every other call goes to MLflow's own
function unchanged, so its checks, messages, auto-started runs, async logging and logged-model
handling stay MLflow's.

``TRACKD_MLFLOW_FAST_PATH=0`` turns the wrapper off (read once, when the first trackd store
is made).
"""
from __future__ import annotations

import functools
import inspect
import os

import mlflow
from mlflow.tracking import fluent
from mlflow.tracking._tracking_service import utils as tracking_utils
from mlflow.utils.time import get_current_time_millis

from . import mlflow_compat as compat

SWITCH_ENV = "TRACKD_MLFLOW_FAST_PATH"
_ASYNC_ENV = "MLFLOW_ENABLE_ASYNC_LOGGING"
_URI_ENV = "MLFLOW_TRACKING_URI"
_INT64_MAX = 2**63 - 1
_INT64_MIN = -2**63
_KEYS_MAX = 65536  # keys remembered as valid; the set starts over beyond

# The active run stack: one list for every thread before MLflow 2.22, a ThreadLocalVariable
# (one list per thread) from 2.22 on.
_stack = fluent._active_run_stack  # pylint: disable=protected-access
_stack_of_thread = _stack.get if hasattr(_stack, "get") else (lambda: _stack)
# MLflow 3's active model (set_active_model, MLFLOW_ACTIVE_MODEL_ID); MLflow 2 has none.
_active_model_id = getattr(fluent, "get_active_model_id", lambda: None)


class _Cache:
    """Which store the current tracking URI names, resolved by MLflow once per URI and again
    whenever a trackd store is made (MLflow may have replaced the one it caches)."""

    def __init__(self):
        self.uri = None
        self.store = None  # the TrackdStore for uri, or None when uri is not trackd's

    def store_for(self, uri):
        if uri is not self.uri and uri != self.uri:
            from .mlflow_store import TrackdStore

            store = tracking_utils._get_store(uri)  # pylint: disable=protected-access
            self.store = store if isinstance(store, TrackdStore) else None
            self.uri = uri
        return self.store

    def forget(self):
        self.uri = None
        self.store = None


_cache = _Cache()
_valid_keys: set[str] = set()
_installed = False


def _key_ok(key) -> bool:
    """True when MLflow's _validate_metric accepts key (name rules and length; the rest of its
    checks concern the value, timestamp and step, which the caller checks)."""
    if type(key) is not str:  # noqa: E721 -- exactly str (hashable, and as the set holds)
        return False
    if key in _valid_keys:
        return True
    try:
        compat._validate_metric(key, 0.0, 0, 0)  # pylint: disable=protected-access
    except Exception:  # pylint: disable=broad-except -- MLflow's own path raises it again
        return False
    if len(_valid_keys) >= _KEYS_MAX:
        _valid_keys.clear()
    _valid_keys.add(key)
    return True


def _step_ts(step, timestamp):
    """(step, timestamp) as the store takes them -- MLflow's `step or 0` and `timestamp or now`
    (None: the shim stamps it) -- or None when MLflow's own path must look at them."""
    if step is None:
        step = 0
    elif type(step) is not int or not _INT64_MIN <= step <= _INT64_MAX:  # noqa: E721
        return None
    if timestamp is None or (type(timestamp) is int and timestamp == 0):  # noqa: E721
        timestamp = None  # no truth test on other types: MLflow's path meets them first
    elif type(timestamp) is not int or not 0 < timestamp <= _INT64_MAX:  # noqa: E721
        return None
    return step, timestamp


def _target(synchronous, run_id, rest, kwargs, names):
    """(store, run id) when the call may take the fast path as far as its context goes: the
    tracking URI names a trackd store; no run_id, model_id or dataset, and no keyword this
    MLflow's function does not take (names: those it does); synchronous (None or True: MLflow
    reads any other value as asynchronous); and a run active on this thread with no logged
    model outputs and no active model. Else None."""
    uri = tracking_utils._tracking_uri or os.environ.get(_URI_ENV)  # as get_tracking_uri
    store = _cache.store_for(uri) if uri else None
    if (store is None or run_id is not None or rest
            or (synchronous is not None and synchronous is not True)):
        return None
    if kwargs and any(v is not None or k not in names for k, v in kwargs.items()):
        return None
    if synchronous is None:
        a = os.environ.get(_ASYNC_ENV)
        if a is not None and a.lower() not in ("false", "0"):
            return None
    stack = _stack_of_thread()
    if not stack or _active_model_id() is not None:
        return None
    run = stack[-1]
    outputs = getattr(run, "outputs", None)  # MLflow 3: metrics of the run's logged models
    if outputs is not None and outputs.model_outputs:
        return None
    return store, run.info.run_id


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
        if target is None or not _key_ok(key):
            # bool, numpy, tensors, odd steps and times, another run or store: MLflow's way
            return original(key, value, step, synchronous, timestamp, run_id, *rest, **kwargs)
        target[0]._log_metric_fast(target[1], key, float(value), st[0], st[1])
        return None

    log_metric.__trackd_original__ = original
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
                if (t is not float and t is not int) or not _key_ok(k):
                    target = None
                    break
        if target is None:
            return original(metrics, step, synchronous, run_id, timestamp, *rest, **kwargs)
        # One time for the whole dict, as MLflow's (the shim would stamp each frame it fills).
        ts = st[1] if st[1] is not None else get_current_time_millis()
        target[0]._log_metrics_fast(target[1], metrics, st[0], ts)
        return None

    log_metrics.__trackd_original__ = original
    return log_metrics


def _wrap(name, make):
    wrapped = make(getattr(fluent, name))
    setattr(fluent, name, wrapped)
    if getattr(mlflow, name, None) is wrapped.__trackd_original__:
        setattr(mlflow, name, wrapped)


def store_made():
    """Called by every new TrackdStore: installs the wrapper once per process (unless
    TRACKD_MLFLOW_FAST_PATH=0), and makes the next call resolve its store again."""
    global _installed  # pylint: disable=global-statement
    _cache.forget()
    if _installed or os.environ.get(SWITCH_ENV, "1") in ("0", "false", "False", "no"):
        return
    _installed = True
    _wrap("log_metric", _fast_log_metric)
    _wrap("log_metrics", _fast_log_metrics)
