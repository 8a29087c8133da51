"""A fast path for ``mlflow.log_metric`` under a ``trackd:`` tracking URI.

MLflow's fluent ``log_metric`` builds an ``MlflowClient`` (twice in MLflow 3), resolves the
tracking and registry URIs, looks for a Spark session and wraps the point in entities before it
reaches the store: 40-120 µs a call, where the store itself needs a few. The wrapper installed
here takes the common call -- the active run of this thread, no ``run_id``, ``model_id`` or
``dataset``, synchronous, a float or int value, int step and timestamp, a key MLflow already
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
import os

import mlflow
from mlflow.tracking import fluent
from mlflow.tracking._tracking_service import utils as tracking_utils

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

            store = tracking_utils._get_store()  # pylint: disable=protected-access
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
    if key in _valid_keys:
        return True
    if type(key) is not str:  # noqa: E721 -- exactly str, as the set holds
        return False
    try:
        compat._validate_metric(key, 0.0, 0, 0)  # pylint: disable=protected-access
    except Exception:  # pylint: disable=broad-except -- MLflow's own path raises it again
        return False
    if len(_valid_keys) >= _KEYS_MAX:
        _valid_keys.clear()
    _valid_keys.add(key)
    return True


def _fast_log_metric(original):
    @functools.wraps(original)
    def log_metric(key, value, step=None, synchronous=None, timestamp=None, run_id=None, *rest,
                   **kwargs):
        # The order of the tests follows what is cheapest to rule out.
        uri = tracking_utils._tracking_uri or os.environ.get(_URI_ENV)  # as get_tracking_uri
        store = _cache.store_for(uri) if uri else None
        if (store is None or run_id is not None or rest or synchronous is False
                or (kwargs and any(v is not None for v in kwargs.values()))):
            return original(key, value, step, synchronous, timestamp, run_id, *rest, **kwargs)
        t = type(value)
        if t is not float and t is not int:  # bool, numpy, tensors: MLflow converts them
            return original(key, value, step, synchronous, timestamp, run_id, *rest, **kwargs)
        if step is None:
            step = 0
        elif type(step) is not int or not _INT64_MIN <= step <= _INT64_MAX:  # noqa: E721
            return original(key, value, step, synchronous, timestamp, run_id, *rest, **kwargs)
        if not timestamp:
            timestamp = None  # now, as MLflow's `timestamp or get_current_time_millis()`
        elif type(timestamp) is not int or not 0 < timestamp <= _INT64_MAX:  # noqa: E721
            return original(key, value, step, synchronous, timestamp, run_id, *rest, **kwargs)
        if synchronous is None:
            a = os.environ.get(_ASYNC_ENV)
            if a is not None and a.lower() not in ("false", "0"):
                return original(key, value, step, synchronous, timestamp, run_id, *rest,
                                **kwargs)
        stack = _stack_of_thread()
        if not stack or not _key_ok(key) or _active_model_id() is not None:
            return original(key, value, step, synchronous, timestamp, run_id, *rest, **kwargs)
        run = stack[-1]
        outputs = getattr(run, "outputs", None)  # MLflow 3: metrics of the run's logged models
        if outputs is not None and outputs.model_outputs:
            return original(key, value, step, synchronous, timestamp, run_id, *rest, **kwargs)
        store._log_metric_fast(run.info.run_id, key, float(value), step, timestamp)
        return None

    log_metric.__trackd_original__ = original
    return log_metric


def store_made():
    """Called by every new TrackdStore: installs the wrapper once per process (unless
    TRACKD_MLFLOW_FAST_PATH=0), and makes the next call resolve its store again."""
    global _installed  # pylint: disable=global-statement
    _cache.forget()
    if _installed or os.environ.get(SWITCH_ENV, "1") in ("0", "false", "False", "no"):
        return
    _installed = True
    wrapped = _fast_log_metric(fluent.log_metric)
    fluent.log_metric = wrapped
    if getattr(mlflow, "log_metric", None) is wrapped.__trackd_original__:
        mlflow.log_metric = wrapped
