"""trackd: log MLflow runs, params, tags and metrics through the node-local trackd agent.

A fluent API shaped like MLflow's::

    import trackd

    with trackd.start_run(experiment="mnist", run_name="baseline") as run:
        trackd.log_params({"lr": 0.01, "batch_size": 64})
        for step in range(1000):
            trackd.log_metric("train/loss", loss, step=step)
    # the run is FINISHED (FAILED if the block raised) and flushed

Log calls copy the event into a bounded in-process buffer and return; the
agent writes it into MLflow's PostgreSQL database. ``flush()`` is the barrier.
Events the agent rejects (a changed param, an invalid key) are logged through
``logging.getLogger("trackd")``, raised as :class:`TrackdError` by the next
``flush()`` or ``end_run()``, and kept for :func:`errors`.

One client per process, made on first use: the socket is the first
``start_run(socket=...)``, else ``$TRACKD_SOCKET``, else
``/run/trackd/trackd.sock``. ``$TRACKD_BUFFER_BYTES``, ``$TRACKD_OVERFLOW``
(``drop`` or ``block``) and ``$TRACKD_BLOCK_TIMEOUT_MS`` (or :func:`configure`)
size its buffer. The active run is shared by all threads of the process. After
``os.fork()`` the child starts with no client and no active run; the parent's
are left alone.

For explicit control use :class:`Client` (``trackd._trackd.Client``) directly.
"""
from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
import time
from typing import Any, Dict, List, Mapping, Optional, Tuple

from . import _trackd
from ._trackd import Client, new_run_id

__all__ = [
    "ActiveRunError",
    "Client",
    "Run",
    "TrackdError",
    "active_run",
    "configure",
    "end_run",
    "errors",
    "flush",
    "get_client",
    "log_artifact",
    "log_artifacts",
    "log_metric",
    "log_metrics",
    "log_param",
    "log_params",
    "new_run_id",
    "set_tag",
    "set_tags",
    "shutdown",
    "start_run",
    "stats",
]

__version__: str = _trackd.__version__

#: An error the agent reported: (frame sequence number, wire error code, message).
ErrorInfo = Tuple[int, int, str]

_log = logging.getLogger("trackd")

_END_RUN_TIMEOUT = 5.0
_DEFAULT_EXIT_TIMEOUT = 10.0


class TrackdError(Exception):
    """Events the trackd agent rejected since the last check.

    ``errors`` holds the ``(seq, code, message)`` tuples; the message of the
    exception lists the agent's messages (MLflow's wording).
    """

    def __init__(self, errors: List[ErrorInfo]) -> None:
        self.errors: List[ErrorInfo] = list(errors)
        lines = "\n".join(f"  {message} (code {code})" for _, code, message in self.errors)
        super().__init__(f"the trackd agent rejected {len(self.errors)} event(s):\n{lines}")


class ActiveRunError(Exception):
    """start_run() was called while a run is active and nested=False (as MLflow raises)."""


class Run:
    """A run started by :func:`start_run`; a context manager that ends it.

    ``with trackd.start_run() as run:`` ends the run FINISHED when the block
    completes and FAILED when it raises (the exception propagates).
    ``run_name`` is None when the agent picks a random name.
    """

    __slots__ = ("run_id", "experiment", "run_name", "parent_run_id", "_client")

    def __init__(self, run_id: str, experiment: str, run_name: Optional[str],
                 parent_run_id: Optional[str], client: Client) -> None:
        self.run_id = run_id
        self.experiment = experiment
        self.run_name = run_name
        self.parent_run_id = parent_run_id
        self._client = client

    def __repr__(self) -> str:
        return (f"<trackd.Run run_id={self.run_id!r} experiment={self.experiment!r} "
                f"run_name={self.run_name!r}>")

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            _end(self, "FINISHED", _END_RUN_TIMEOUT)
            return
        try:
            _end(self, "FAILED", _END_RUN_TIMEOUT)
        except TrackdError:
            pass  # already logged; the body's exception is the one to see


class _State:
    """Everything per process; replaced wholesale in a forked child."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.pid = os.getpid()
        self.client: Optional[Client] = None
        self.socket: Optional[str] = None
        self.options: Dict[str, Any] = {}
        self.stack: List[Run] = []
        self.errors: List[ErrorInfo] = []      # collected, not yet returned by errors()
        self.unreported: List[ErrorInfo] = []  # collected, not yet raised
        self.dropped_seen = 0


_state = _State()


def _after_fork_in_child() -> None:
    # The parent's client has no sender thread here: drop it (the extension
    # leaks it rather than closing it) together with the parent's runs.
    global _state
    _state = _State()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _env_int(name: str) -> int:
    value = os.environ.get(name, "").strip()
    if not value:
        return 0
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"${name} must be an integer, not {value!r}") from None


def _source_name() -> str:
    # What MLflow records as mlflow.source.name for a script.
    return sys.argv[0] if sys.argv and sys.argv[0] else "<console>"


def configure(socket: Optional[str] = None, buffer_bytes: Optional[int] = None,
              overflow: Optional[str] = None, block_timeout_ms: Optional[int] = None) -> None:
    """Sets the options of the process-wide client before it is made.

    Arguments left None fall back to ``$TRACKD_SOCKET``, ``$TRACKD_BUFFER_BYTES``,
    ``$TRACKD_OVERFLOW`` and ``$TRACKD_BLOCK_TIMEOUT_MS``, then to the library's
    defaults (16 MiB, drop the newest event when full). Raises RuntimeError once
    the client exists (after the first start_run()).
    """
    st = _state
    with st.lock:
        if st.client is not None:
            raise RuntimeError("trackd.configure() must be called before the first start_run()")
        given = {"socket": socket, "buffer_bytes": buffer_bytes, "overflow": overflow,
                 "block_timeout_ms": block_timeout_ms}
        st.options.update({k: v for k, v in given.items() if v is not None})


def get_client(socket: Optional[str] = None) -> Client:
    """Returns the process-wide client, making it on first use.

    socket is used only if the client does not exist yet: the first caller wins.
    """
    st = _state
    client = st.client
    if client is not None:
        if socket is not None and socket != st.socket:
            _log.warning("trackd client already uses socket %s; ignoring socket=%s",
                         st.socket or "(default)", socket)
        return client
    with st.lock:
        if st.client is None:
            opts = st.options
            sock = socket if socket is not None else opts.get("socket")
            st.client = Client(
                socket=sock,
                buffer_bytes=opts.get("buffer_bytes", _env_int("TRACKD_BUFFER_BYTES")),
                overflow=opts.get("overflow", os.environ.get("TRACKD_OVERFLOW") or "drop"),
                block_timeout_ms=opts.get("block_timeout_ms",
                                          _env_int("TRACKD_BLOCK_TIMEOUT_MS")),
                source_name=_source_name())
            st.socket = sock
        return st.client


def _collect(st: _State) -> None:
    """Moves the agent's errors out of the client, logging each once."""
    client = st.client
    if client is None or client.closed:
        return
    new = client.errors()
    for seq, code, message in new:
        _log.warning("trackd agent rejected an event (seq %d, code %d): %s", seq, code, message)
    dropped = client.stats()["dropped"]
    if dropped > st.dropped_seen:
        _log.warning("trackd dropped %d event(s) (buffer full or the agent unreachable); "
                     "see trackd.stats()", dropped - st.dropped_seen)
        st.dropped_seen = dropped
    if new:
        st.errors.extend(new)
        st.unreported.extend(new)


def _check(st: _State) -> None:
    """Raises TrackdError for errors that arrived since the last check."""
    with st.lock:
        _collect(st)
        new, st.unreported = st.unreported, []
    if new:
        raise TrackdError(new)


def _no_active_run(what: str) -> RuntimeError:
    return RuntimeError(f"trackd.{what}(): no active run; call trackd.start_run() first")


def start_run(experiment: Optional[str] = "Default", run_name: Optional[str] = None,
              tags: Optional[Mapping[str, Any]] = None, socket: Optional[str] = None,
              nested: bool = False) -> Run:
    """Starts a run in the named experiment (created if missing) and makes it active.

    Returns a :class:`Run`, usable as a context manager. Tag values are
    stringified with str(). Raises :class:`ActiveRunError` if a run is active
    and nested is False; with nested=True the new run gets the tag
    ``mlflow.parentRunId`` of the active run. socket is used only by the first
    call of the process (see :func:`get_client`).
    """
    experiment = experiment or "Default"
    client = get_client(socket)
    st = _state
    with st.lock:
        parent = st.stack[-1] if st.stack else None
        if parent is not None and not nested:
            raise ActiveRunError(
                f"Run with UUID {st.stack[0].run_id} is already active. To start a new run, "
                "first end the current run with trackd.end_run(). To start a nested run, "
                "call start_run with nested=True")
        run_tags = {k: str(v) for k, v in (tags or {}).items()}
        if parent is not None:
            run_tags["mlflow.parentRunId"] = parent.run_id
        run = Run(new_run_id(), experiment, run_name, parent.run_id if parent else None, client)
        if not client.start_run(run.run_id, experiment, run_name, None, run_tags):
            _log.warning("trackd dropped the start of run %s: the buffer is full", run.run_id)
        st.stack.append(run)
    return run


def active_run() -> Optional[Run]:
    """Returns the active run (the innermost nested one), or None."""
    stack = _state.stack
    return stack[-1] if stack else None


def _end(run: Run, status: str, timeout: Optional[float]) -> None:
    """Ends run (and runs nested in it that are still active), then flushes and checks errors."""
    st = _state
    with st.lock:
        if run not in st.stack:
            return
        while st.stack:
            top = st.stack.pop()
            top._client.end_run(top.run_id, status)
            if top is run:
                break
    if not run._client.flush(timeout):
        _log.warning("trackd: the agent did not confirm run %s within %s s; it keeps "
                     "delivering in the background", run.run_id, timeout)
    _check(st)


def end_run(status: str = "FINISHED", timeout: Optional[float] = _END_RUN_TIMEOUT) -> None:
    """Ends the active run with status FINISHED, FAILED or KILLED (no-op without one).

    Flushes for up to timeout seconds (None: no limit) and raises
    :class:`TrackdError` if the agent rejected events since the last check.
    The parent of a nested run becomes active again.
    """
    run = active_run()
    if run is not None:
        _end(run, status, timeout)


def _active(what: str) -> Run:
    try:
        return _state.stack[-1]
    except IndexError:
        raise _no_active_run(what) from None


def log_metric(key: str, value: Any, step: int = 0, timestamp: Optional[int] = None) -> bool:
    """Logs one metric point on the active run.

    value: float, int, a numpy scalar or anything with __float__; NaN and
    +-Inf are stored as MLflow stores them. timestamp: epoch milliseconds
    (default now). Returns False if the full buffer dropped the point.
    """
    try:
        run = _state.stack[-1]
    except IndexError:
        raise _no_active_run("log_metric") from None
    return run._client.log_metric(run.run_id, key, value, step, timestamp)


def log_metrics(metrics: Mapping[str, Any], step: int = 0,
                timestamp: Optional[int] = None) -> bool:
    """Logs {key: value} on the active run at one step and timestamp (default now).

    Returns False if the full buffer dropped any point.
    """
    run = _active("log_metrics")
    if type(metrics) is not dict:
        metrics = dict(metrics)
    return run._client.log_metrics(run.run_id, metrics, step, timestamp)


def log_param(key: str, value: Any) -> bool:
    """Logs a param on the active run; value is stringified with str().

    Params are immutable: logging a different value later is rejected by the
    agent with MLflow's message (see :class:`TrackdError`).
    """
    run = _active("log_param")
    return run._client.log_param(run.run_id, key, str(value))


def log_params(params: Mapping[str, Any]) -> bool:
    """Logs several params on the active run; values are stringified with str()."""
    run = _active("log_params")
    return run._client.log_params(run.run_id, {k: str(v) for k, v in params.items()})


def set_tag(key: str, value: Any) -> bool:
    """Sets a tag on the active run (upserted); value is stringified with str()."""
    run = _active("set_tag")
    return run._client.set_tag(run.run_id, key, str(value))


def set_tags(tags: Mapping[str, Any]) -> bool:
    """Sets several tags on the active run; values are stringified with str()."""
    run = _active("set_tags")
    return run._client.set_tags(run.run_id, {k: str(v) for k, v in tags.items()})


def log_artifact(local_path: "os.PathLike[str] | str",
                 artifact_path: Optional[str] = None) -> bool:
    """Hands a file to the agent for upload to the active run's artifact store, below
    artifact_path. Returns at once: the agent holds the open file, so it may be deleted or
    renamed right away (rewriting it in place before the agent has copied it is the one
    race). flush() returns once the upload is done."""
    run = _active("log_artifact")
    return run._client.log_artifact(run.run_id, os.fspath(local_path), artifact_path)


def log_artifacts(local_dir: "os.PathLike[str] | str",
                  artifact_path: Optional[str] = None) -> int:
    """Hands every file below local_dir to the agent, keeping relative paths under
    artifact_path. Returns how many files were handed over."""
    run = _active("log_artifacts")
    return run._client.log_artifacts(run.run_id, os.fspath(local_dir), artifact_path)


def flush(timeout: Optional[float] = None) -> bool:
    """Waits until everything logged before the call is committed by the agent.

    Returns True then, False after timeout seconds (None: no limit). Raises
    :class:`TrackdError` if the agent rejected events since the last check.
    """
    st = _state
    client = st.client
    ok = True if client is None else client.flush(timeout)
    _check(st)
    return ok


def stats() -> Dict[str, int]:
    """The process-wide client's counters: queued, sent, dropped, errors, errors_lost,
    reconnects, buffered_bytes, connected."""
    return get_client().stats()


def errors() -> List[ErrorInfo]:
    """Removes and returns the errors the agent reported, as (seq, code, message).

    Includes errors already raised by flush() or end_run(); they are not raised again.
    """
    st = _state
    with st.lock:
        _collect(st)
        out, st.errors, st.unreported = st.errors, [], []
    return out


def shutdown(timeout: Optional[float] = _DEFAULT_EXIT_TIMEOUT) -> None:
    """Ends active runs FINISHED, flushes for at most timeout seconds and closes the client.

    Logs (does not raise) errors the agent reported. The next start_run()
    makes a new client, which may use another socket. Runs at exit with
    $TRACKD_EXIT_TIMEOUT (default 10 s); never waits longer than the timeout
    plus about two seconds for a socket the agent stopped reading.
    """
    st = _state
    if st.client is None:
        return
    deadline = None if timeout is None else time.monotonic() + timeout
    # Another thread may hold the lock (at exit, a daemon thread): never wait for it for long.
    locked = st.lock.acquire(timeout=1.0 if timeout is None else min(1.0, max(timeout, 0.0)))
    try:
        client = st.client
        if client is None or client.closed:
            st.client = None
            return
        while st.stack:
            run = st.stack.pop()
            run._client.end_run(run.run_id, "FINISHED")
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        if not client.flush(left):
            _log.warning("trackd: not everything logged was confirmed by the agent within "
                         "%s s; closing anyway", timeout)
        _collect(st)
        st.client = None
        st.socket = None
        st.dropped_seen = 0
        client.close(0)
    finally:
        if locked:
            st.lock.release()


def _at_exit() -> None:
    try:
        timeout = float(os.environ.get("TRACKD_EXIT_TIMEOUT", _DEFAULT_EXIT_TIMEOUT))
    except ValueError:
        timeout = _DEFAULT_EXIT_TIMEOUT
    try:
        shutdown(timeout)
    except Exception:  # exiting anyway: report, never hang or crash the exit
        _log.exception("trackd: error while closing at exit")


atexit.register(_at_exit)
