"""`trackd import`: moves an MLflow local store, a file store (`mlruns/`) or a SQLite
`mlflow.db`, into the MLflow PostgreSQL database trackd writes to.

The rows are MLflow's rows: MLflow's client, server and UI read the result as if MLflow had
logged every call into PostgreSQL itself. Metric points go by COPY. Experiments merge by name
into the target; runs, logged models and registered models already there are compared and
skipped, so an interrupted import run again finishes without duplicates.

Needs the `import` extra: `pip install 'trackd[import]'` (psycopg, PyYAML, tqdm).
"""
from __future__ import annotations

from typing import Callable, Optional

import psycopg

from .artifacts import ArtifactCopier
from .entities import Report, SourceError
from .filestore import FileStoreReader, resolve_root
from .progress import Progress
from .target import Target
from .writers import Writers

__all__ = ["ArtifactCopier", "import_store", "open_source", "SourceError"]

#: Runs per transaction, and metric bytes (file store) per transaction: small enough that an
#: interruption loses little work, large enough that COPY runs at full speed.
BATCH_RUNS = 200
BATCH_POINTS = 100_000


def open_source(source: str, report: Report):
    """A reader for SOURCE: `sqlite:///path` (or a path ending in .db) for a SQLite store, a
    directory for a file store. Raises SourceError with what to do."""
    if source.startswith("sqlite:") or source.endswith(".db"):
        from .sqlitestore import SqliteReader
        return SqliteReader.open(source, report)
    root = resolve_root(source)
    if root is None:
        raise SourceError(f"{source}: not an MLflow file store (no mlruns/ in it, and no "
                          "experiment directory, .trash or models/ directly under it)")
    return FileStoreReader(root, report)


def import_store(reader, dsn: str, report: Report, *,
                 experiments: Optional[list] = None, dry_run: bool = False, jobs: int = 2,
                 copier: Optional[ArtifactCopier] = None, progress: Optional[Progress] = None,
                 say: Callable[[str], None] = lambda s: None) -> None:
    """Imports everything reader holds into the database dsn names.

    experiments: names to import (others are left out); None for all. dry_run: read and check
    everything, write nothing. jobs: writer connections that COPY runs' batches in parallel.
    copier: copies artifacts into the agent's artifact root and rewrites the locations that
    name them; None keeps every location as recorded. Counts and messages go to report.
    Raises SourceError when the source's schema revision differs from the target's,
    psycopg.Error when the target fails."""
    with psycopg.connect(dsn, application_name="trackd import") as conn:
        _import(reader, conn, dsn, report, experiments, dry_run, jobs, copier,
                progress or Progress(0, enabled=False), say)


def _import(reader, conn, dsn, report, experiments, dry_run, jobs, copier, progress,
            say) -> None:
    target = Target(conn, report, dry_run=dry_run, copier=copier)
    if copier is not None:
        top = copier.experiment_location(2**31 - 1)
        copier.probe([
            (copier.run_uri(top, "0" * 32), "runs.artifact_uri",
             target.columns["runs"]["artifact_uri"]),
            (copier.model_uri(top, "m-" + "0" * 32), "logged_models.artifact_location",
             target.columns.get("logged_models", {}).get("artifact_location"))],
            create=not dry_run)
    theirs, ours = reader.revision(), target.revision()
    if theirs is not None and theirs != ours:
        raise SourceError(
            f"{reader.describe()} is at MLflow schema revision {theirs}, the target database at "
            f"{ours}. Bring the source to the target's revision first, on a copy: "
            f"`mlflow db upgrade sqlite:///COPY.db` with the MLflow release that made the "
            f"target (or upgrade the target if it is the older one), then import the copy.")
    exps = reader.experiments()
    if experiments is not None:
        wanted = set(experiments)
        missing = wanted - {e.name for e in exps}
        if missing:
            raise SourceError(f"{reader.describe()} has no experiment named "
                              + ", ".join(repr(m) for m in sorted(missing)))
        exps = [e for e in exps if e.name in wanted]
    total = sum(reader.count_runs(e) for e in exps)
    say(f"{reader.describe()}: {len(exps)} experiments, {total} runs"
        + (" (dry run: nothing is written)" if dry_run else ""))
    target.experiments(exps, reader.datasets)
    for e in exps:
        if e.source_id not in target.exp_map:
            report.add("runs not imported (their experiment was refused)", reader.count_runs(e))
    exps = [e for e in exps if e.source_id in target.exp_map]
    progress.start(total)
    writers = None if dry_run else Writers(dsn, jobs, progress)
    seen: set = set()

    def flush(runs):
        b = target.prepare_runs(runs)
        if writers is not None:
            writers.submit(b)
        else:
            progress.advance(runs=b.runs + b.skipped, points=b.points)

    def write_large(run):
        # Larger than a batch: its points stream from the source into COPY on this thread,
        # one key at a time, while the writers finish what they hold.
        b = target.prepare_runs([run], lazy=True)
        target.write_now(b)
        progress.advance(runs=b.runs + b.skipped, points=b.points)

    try:
        for e in exps:
            batch, points = [], 0
            for run in reader.runs(e):
                if run.run_uuid in seen:
                    report.refuse("runs", f"run {run.run_uuid} ({run.where}): a second run "
                                  "with this id in the source")
                    continue
                seen.add(run.run_uuid)
                if run.size_hint > BATCH_POINTS:
                    write_large(run)
                    continue
                batch.append(run)
                points += run.size_hint
                if len(batch) >= BATCH_RUNS or points >= BATCH_POINTS:
                    flush(batch)
                    batch, points = [], 0
            if batch:
                flush(batch)
            traces = reader.traces(e)
            if traces:
                report.add("traces not imported", traces)
        if writers is not None:
            writers.close()
    except BaseException:
        if writers is not None:
            writers.abort()
        raise
    progress.close()
    # A logged model's metrics name runs that may live in other experiments: all runs first.
    for e in exps:
        for m in reader.logged_models(e):
            target.logged_model(m)
    if experiments is None:
        for rm in reader.registered_models():
            target.registered_model(rm)
    for table, n in reader.skipped_tables().items():
        report.add(f"{table} rows not imported", n)


def summary(report: Report, seconds: float, dry_run: bool = False) -> str:
    """The final summary: every count, imported first, then what was skipped or refused.
    The rate is over the whole command (reading the source, experiments, models included)."""
    head = ("trackd import: dry run finished, nothing was written; \"imported\" is what would "
            "be" if dry_run else "trackd import: finished")
    lines = [f"{head} in {seconds:.2f} s"]
    for what, n in sorted(report.counts.items(), key=lambda kv: (not kv[0].endswith("imported"),
                                                                   kv[0])):
        if n:
            lines.append(f"  {what:<52} {n:>12,}")
    points = report.counts.get("metric points imported", 0)
    if seconds > 0 and points:
        lines.append(f"  {'metric points per second, start to end':<52} "
                     f"{points / seconds:>12,.0f}")
    return "\n".join(lines)
