"""`trackd import --copy-artifacts`: copies runs' and logged models' artifacts into the
agent's artifact root, where the agent would have put them, and gives the new locations.

The locations follow the agent's (and MLflow's SQL store's) layout: an experiment the import
creates gets `<[mlflow] default_artifact_root>/<experiment id>`; a run gets
`<experiment location>/<run id>/artifacts`; a logged model
`<experiment location>/models/<model id>/artifacts`. An experiment merged into one already in
the target keeps the target's location. Files go through MLflow's own artifact repositories
(a local path or file:// URI, s3://, mlflow-artifacts:), so they need the `mlflow` package.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Optional
from urllib.parse import unquote, urlparse

from .entities import Refused, Report, SourceError


def _local_path(uri: Optional[str]) -> Optional[Path]:
    """The directory a local artifact URI names (a path or file://), else None."""
    if not uri:
        return None
    u = urlparse(uri)
    if u.scheme == "file":
        return Path(unquote(u.path))
    if u.scheme == "":
        return Path(uri)
    return None


class ArtifactCopier:
    """Copies artifact trees into root (the agent's `[mlflow] default_artifact_root`).

    server_url: the MLflow server for `mlflow-artifacts:` URIs without a host (the agent's
    `[artifacts] mlflow_server_url`). Raises SourceError when MLflow is not installed."""

    def __init__(self, root: str, report: Report, server_url: Optional[str] = None):
        if not root:
            raise SourceError("--copy-artifacts needs an artifact root: set [mlflow] "
                              "default_artifact_root in the agent's configuration")
        try:
            from mlflow.store.artifact.artifact_repository_registry import \
                get_artifact_repository
        except ImportError as e:
            raise SourceError(f"--copy-artifacts copies through MLflow's artifact "
                              f"repositories, and MLflow cannot be imported here ({e}): "
                              "pip install mlflow into this Python") from None
        if root.startswith("mlflow-artifacts:") and not server_url:
            raise SourceError(f"the artifact root {root} names an MLflow server's artifact "
                              "proxy: set [artifacts] mlflow_server_url to that server's URL")
        self._repo = get_artifact_repository
        self.server_url = server_url
        self.root = root if root.endswith("/") else root + "/"
        self.report = report

    def experiment_location(self, experiment_id) -> str:
        """An experiment's artifact_location, as the agent makes it."""
        return f"{self.root}{experiment_id}"

    @staticmethod
    def run_uri(location: str, run_id: str) -> str:
        return f"{location.rstrip('/')}/{run_id}/artifacts"

    @staticmethod
    def model_uri(location: str, model_id: str) -> str:
        return f"{location.rstrip('/')}/models/{model_id}/artifacts"

    def locate(self, source: Optional[str], fallback: Optional[str] = None):
        """Where an entity's files can be read: its recorded location (a local path, or a
        remote URI as it is), else fallback (the entity's directory in a store moved from
        another machine, or in its .trash); None when there is nothing here to copy (no
        files found, or an MLflow server's artifact proxy the URI does not name). Raises
        OSError or ValueError on a location that cannot be looked at."""
        if not source:
            return None
        u = urlparse(source)
        if u.scheme == "mlflow-artifacts" and not u.netloc:
            return None
        local = _local_path(source)
        if local is None:
            return source
        if local.is_dir():
            return str(local)
        if fallback and Path(fallback).is_dir():
            # An empty one stands in only for a location of the store's own layout (the same
            # experiment, entity and artifacts directory): an empty fallback beside another
            # location (a share not mounted here) would hide where the files are.
            if any(Path(fallback).iterdir()) or local.parts[-3:] == Path(fallback).parts[-3:]:
                return fallback
        return None

    def copy(self, source: Optional[str], dest: str, what: str,
             fallback: Optional[str] = None, write: bool = True) -> bool:
        """Copies every file below source (see locate) into dest; files already there are
        replaced, so a copy interrupted and done again ends the same. False, counted and
        with a warning, when there is nothing here to copy: the entity keeps its recorded
        location. write=False (a dry run) only looks. Raises Refused naming both locations
        when the copy fails."""
        found = None
        try:
            found = self.locate(source, fallback)
            if found is None:
                if urlparse(source).scheme == "mlflow-artifacts":
                    self.report.add("artifact locations left on the source's MLflow server")
                    self.report.warn(
                        f"{what}: its artifacts are at {source}, on the MLflow server the "
                        "source logged through, which the URI does not name: left there",
                        "artifacts left")
                else:
                    self.report.add("artifact locations not found here, kept as recorded")
                    self.report.warn(
                        f"{what}: nothing at its recorded location {source}"
                        + (f" nor in {fallback}" if fallback else "") + ": kept as recorded",
                        "artifacts not found")
                return False
            if not write:
                return True
            local = _local_path(found)
            if local is not None:
                target = _local_path(dest)
                if target is not None and target.resolve() == local.resolve():
                    return True  # the root holds the source already
                self._upload(local, dest)
                return True
            with tempfile.TemporaryDirectory(prefix="trackd-import-") as tmp:
                got = Path(self._repo(found).download_artifacts("", dst_path=tmp))
                self._upload(got, dest)
            return True
        except Exception as e:  # MLflow's repositories raise what their transport raises
            raise Refused(f"{what}: its artifacts could not be copied from "
                          f"{found or source} to {dest}: "
                          f"{type(e).__name__}: {str(e).strip()[:300]}") from None

    def probe(self, longest: list, create: bool = True) -> None:
        """Checks, before anything is written, that the longest locations the import may
        write fit their columns ([(location, column, its length or None)]) and, for a local
        root, that the root can be written (create=False, for a dry run, makes nothing: the
        root or its nearest existing parent must be writable). Raises SourceError saying
        what to change."""
        for location, column, limit in longest:
            if limit is not None and len(location) > limit:
                raise SourceError(f"the artifact root {self.root} is too long: locations under "
                                  f"it reach {len(location)} characters, and MLflow's {column} "
                                  f"holds {limit}")
        local = _local_path(self.root)
        if local is None:
            return
        try:
            if not create:
                near = local
                while not near.exists() and near != near.parent:
                    near = near.parent
                if not near.is_dir() or not os.access(near, os.W_OK | os.X_OK):
                    raise NotADirectoryError(f"{near} is not a writable directory")
                return
            local.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=local, prefix=".trackd-import-"):
                pass
        except OSError as e:
            raise SourceError(f"cannot write to the artifact root {local}: {e.strerror or e} "
                              "(set [mlflow] default_artifact_root, or --artifact-root, to a "
                              "directory this user can write)") from None

    def _upload(self, local: Path, dest: str) -> None:
        files = size = 0

        def fail(err):
            raise err

        for d, _, names in os.walk(local, onerror=fail):  # a directory it cannot read fails
            for n in names:
                files += 1
                size += os.path.getsize(os.path.join(d, n))
        if files:
            repo = (self._repo(dest, tracking_uri=self.server_url) if self.server_url
                    else self._repo(dest))
            repo.log_artifacts(str(local))
        self.report.add("artifact files copied", files)
        self.report.add("artifact bytes copied", size)


def under(uri: Optional[str], locations) -> Optional[str]:
    """The longest of locations that uri is, or is below (whole path segments); None."""
    best = None
    for loc in locations if uri else ():
        base = loc.rstrip("/")
        if (uri == loc or uri == base or uri.startswith(base + "/")) and (
                best is None or len(loc) > len(best)):
            best = loc
    return best


def rewrite(uri: Optional[str], moved: dict) -> Optional[str]:
    """uri with the longest prefix found in moved (old location -> new) replaced."""
    old = under(uri, moved)
    if old is None:
        return uri
    return moved[old].rstrip("/") + uri[len(old.rstrip("/")):]
