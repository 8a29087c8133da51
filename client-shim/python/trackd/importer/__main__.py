"""python -m trackd.importer SOURCE [--dsn DSN] [--dry-run] [--experiment NAME ...]

What `trackd import` runs once it has read the agent's configuration and checked the target's
schema; it passes the DSN in TRACKD_IMPORT_DSN (and a password file's password in PGPASSWORD).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import psycopg

from . import ArtifactCopier, SourceError, import_store, open_source, summary
from .entities import Report
from .progress import Progress

EPILOG = """\
SOURCE is an MLflow file store directory (mlruns/, or a directory holding one) or a SQLite
store, sqlite:///path/to/mlflow.db, made by the MLflow release that made the target database.

Experiments merge by name into the target. Runs, logged models and registered models already
there are compared and skipped: after an interruption, run the same command again.
Artifacts stay where they are and runs keep their artifact URIs as recorded, unless
--copy-artifacts copies them into the agent's [mlflow] default_artifact_root (through MLflow's
own artifact repositories: needs the mlflow package) and rewrites the URIs that name them.

Exit status: 0 when everything was imported or was already there; 1 when something needs a
look (refused, already in the target with other data, or merged into a deleted experiment:
each is named on stderr), or the import could not start; 130 when interrupted.
"""


def _positive(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {n}")
    return n


def _plural(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="trackd import", description="Import an MLflow file store or SQLite store into "
        "the MLflow PostgreSQL database trackd writes to.", epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", metavar="SOURCE",
                   help="mlruns/ (or file:///…/mlruns), or sqlite:///…/mlflow.db")
    p.add_argument("--config", metavar="FILE",
                   help="the agent's configuration: the target is its [postgres] dsn (read by "
                   "`trackd import`; default: the agent's defaults and TRACKD_* variables)")
    p.add_argument("--dsn", default=os.environ.get("TRACKD_IMPORT_DSN"),
                   help="the target as a libpq connection string, instead of --config (for "
                   "`python -m trackd.importer`)")
    p.add_argument("--dry-run", action="store_true",
                   help="read and check everything, report what would be imported, write nothing")
    p.add_argument("--experiment", metavar="NAME", action="append",
                   help="import only this experiment (repeat for more); the model registry is "
                   "then left out")
    p.add_argument("--copy-artifacts", action="store_true",
                   help="copy runs' and logged models' artifacts into the artifact root, "
                   "where the agent would put them, and point the rows there")
    p.add_argument("--artifact-root", metavar="URI",
                   help="the root --copy-artifacts copies into (default: the agent's [mlflow] "
                   "default_artifact_root)")
    p.add_argument("--jobs", type=_positive, default=2, metavar="N",
                   help="writer connections that COPY batches of runs at once (default 2)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or lines")
    args = p.parse_args(argv)
    if args.artifact_root is not None and not args.copy_artifacts:
        p.error("--artifact-root is where --copy-artifacts copies to: give both")
    if args.artifact_root is None:
        args.artifact_root = os.environ.get("TRACKD_IMPORT_ARTIFACT_ROOT")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.dsn:
        print("trackd import: no target: run it as `trackd import … --config FILE` (the "
              "agent's configuration), or give --dsn", file=sys.stderr)
        return 1

    def warn(msg: str) -> None:
        print(f"trackd import: {msg}", file=sys.stderr, flush=True)

    report = Report(warn)
    progress = Progress(0, not args.no_progress)
    t0 = time.monotonic()
    try:
        reader = open_source(args.source, report)
        copier = None
        if args.copy_artifacts:
            copier = ArtifactCopier(args.artifact_root or "", report,
                                    os.environ.get("TRACKD_IMPORT_MLFLOW_SERVER_URL"))
        import_store(reader, args.dsn, report, experiments=args.experiment,
                     dry_run=args.dry_run, jobs=args.jobs, copier=copier, progress=progress,
                     say=warn)
    except SourceError as e:
        warn(str(e))
        return 1
    except psycopg.OperationalError as e:
        warn(f"cannot use the target database: {str(e).strip()}")
        return 1
    except psycopg.Error as e:
        warn(f"the target database refused the import: {str(e).strip().rstrip('.')}. What was "
             "committed before stays; run the same command again once the cause is fixed")
        return 1
    except KeyboardInterrupt:
        progress.abandon()
        warn(f"interrupted with {progress.runs:,} of {_plural(progress.total, 'run', 'runs')} "
             "done. What was committed stays; run the same command again to finish (what is "
             "already there is skipped).")
        return 130
    print(summary(report, time.monotonic() - t0, dry_run=args.dry_run), flush=True)
    if report.problems:
        warn(f"{_plural(report.problems, 'entity needs', 'entities need')} a look (refused, "
             "different from the target's, or merged into a deleted experiment); see the "
             "messages above")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
