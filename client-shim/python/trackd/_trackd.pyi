"""Type stubs for trackd._trackd, the CPython binding of libtrackd."""
from types import TracebackType
from typing import (Dict, Iterable, List, Literal, Mapping, Optional, SupportsFloat, SupportsIndex,
                    Tuple, Type, Union)

from typing_extensions import disjoint_base


__version__: str
DEFAULT_SOCKET: str

_Number = Union[float, int, SupportsFloat, SupportsIndex]
_Pairs = Union[Mapping[str, str], Iterable[Tuple[str, str]]]

def new_run_id() -> str: ...

@disjoint_base
class Client:
    def __init__(
        self,
        socket: Optional[str] = None,
        buffer_bytes: int = 0,
        overflow: Literal["drop", "block"] = "drop",
        block_timeout_ms: int = 0,
        source_name: Optional[str] = None,
        source_type: Optional[str] = None,
        context_tags: bool = True,
    ) -> None: ...
    @property
    def closed(self) -> bool: ...
    def create_experiment(self, name: str, artifact_location: Optional[str] = None) -> bool: ...
    def start_run(
        self,
        run_id: str,
        experiment: str,
        run_name: Optional[str] = None,
        start_time: Optional[int] = None,
        tags: Optional[_Pairs] = None,
        experiment_id: Optional[int] = None,
    ) -> bool: ...
    def log_metric(
        self, run_id: str, key: str, value: _Number, step: int = 0, timestamp: Optional[int] = None
    ) -> bool: ...
    def log_metrics(
        self,
        run_id: str,
        metrics: Dict[str, _Number],
        step: int = 0,
        timestamp: Optional[int] = None,
    ) -> bool: ...
    def log_batch(
        self,
        run_id: str,
        metrics: Iterable[Tuple[str, _Number, Optional[int], int]] = (),
        params: _Pairs = (),
        tags: _Pairs = (),
    ) -> bool: ...
    def log_param(self, run_id: str, key: str, value: str) -> bool: ...
    def log_params(self, run_id: str, params: _Pairs) -> bool: ...
    def set_tag(self, run_id: str, key: str, value: str) -> bool: ...
    def set_tags(self, run_id: str, tags: _Pairs) -> bool: ...
    def delete_tag(self, run_id: str, key: str) -> bool: ...
    def log_artifact(
        self, run_id: str, local_path: str, artifact_path: Optional[str] = None
    ) -> bool: ...
    def log_artifacts(
        self, run_id: str, local_dir: str, artifact_path: Optional[str] = None
    ) -> int: ...
    def update_run(
        self,
        run_id: str,
        status: Optional[str] = None,
        end_time: Optional[int] = None,
        run_name: Optional[str] = None,
    ) -> bool: ...
    def end_run(
        self, run_id: str, status: str = "FINISHED", end_time: Optional[int] = None
    ) -> bool: ...
    def flush(self, timeout: Optional[float] = None) -> bool: ...
    def stats(self) -> Dict[str, int]: ...
    def errors(self) -> List[Tuple[int, int, str]]: ...
    def backend_uri(self, timeout: Optional[float] = 5.0) -> Optional[str]: ...
    def close(self, timeout: Optional[float] = 5.0) -> None: ...
    def __enter__(self) -> "Client": ...
    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None: ...
