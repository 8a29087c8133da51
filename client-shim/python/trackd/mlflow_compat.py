"""Every name of MLflow's that the plugin uses and MLflow does not document as public, in one
place, checked against the supported releases: MLflow 2.17 through 3.17 (the compatibility
tests run 2.22.5, 3.10.1 and 3.17.2; tests/integration/test_compat.py).

Importing this module checks the MLflow version first and raises ImportError naming the
supported range when it is outside it, so that ``mlflow.set_tracking_uri("trackd:")`` fails
with that sentence rather than with an AttributeError deep in MLflow.
"""
from __future__ import annotations

import re

import mlflow

SUPPORTED = ((2, 17), (3, 17))  # first and last supported (major, minor), inclusive


def _version(text: str) -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", text)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


MLFLOW_VERSION = _version(mlflow.__version__)
if not SUPPORTED[0] <= MLFLOW_VERSION <= SUPPORTED[1]:
    raise ImportError(
        f"trackd's MLflow plugin supports MLflow {SUPPORTED[0][0]}.{SUPPORTED[0][1]} through "
        f"{SUPPORTED[1][0]}.{SUPPORTED[1][1]}; this is MLflow {mlflow.__version__}. Install a "
        "release in that range, or log with trackd.log_metric() and friends, which need no "
        "MLflow")

# pylint: disable=unused-import,wrong-import-position
# MLflow's own validation, so that errors read as MLflow's (mlflow/utils/validation.py; the
# same functions and messages in every supported release).
from mlflow.utils.name_utils import _generate_random_name  # noqa: E402,F401
from mlflow.utils.validation import (  # noqa: E402,F401
    _validate_batch_log_data,
    _validate_batch_log_limits,
    _validate_experiment_name,
    _validate_metric,
    _validate_param,
    _validate_param_keys_unique,
    _validate_run_id,
    _validate_tag,
    _validate_tag_name,
)

try:  # MLflow 2.21 on
    from mlflow.utils.validation import (  # noqa: E402
        _validate_experiment_artifact_location_length,
    )
except ImportError:  # MLflow 2.17 to 2.20 do not check the length: neither do we
    def _validate_experiment_artifact_location_length(artifact_location: str) -> None:
        """MLflow before 2.21 accepts any length here."""


def artifact_repos_cache():
    """MLflow's per-process cache of artifact repositories by run id
    (mlflow.tracking._tracking_service.utils._artifact_repos_cache, a dict-like object in every
    supported release), or None if this MLflow has none: then MLflow uploads artifacts itself."""
    from mlflow.tracking._tracking_service import utils as tracking_utils

    return getattr(tracking_utils, "_artifact_repos_cache", None)
