"""Writer threads: each holds its own PostgreSQL connection and commits whole batches, so
PostgreSQL's work on one batch (index inserts, foreign-key checks, WAL) runs beside the
reading of the next. The queue between them is bounded: memory stays at a few batches."""
from __future__ import annotations

import queue
import threading
from typing import Optional

import psycopg


class Writers:
    """submit(batch) hands a Batch to the next free writer; close() waits for every batch to
    commit. A writer's error stops the import: submit and close raise it."""

    def __init__(self, dsn: str, jobs: int, progress):
        self.progress = progress
        self.queue: queue.Queue = queue.Queue(maxsize=jobs)
        self.error: Optional[BaseException] = None
        self.conns = [psycopg.connect(dsn, application_name="trackd import")
                      for _ in range(jobs)]
        self.threads = [threading.Thread(target=self._work, args=(c,), daemon=True,
                                         name=f"trackd-import-writer-{i}")
                        for i, c in enumerate(self.conns)]
        for t in self.threads:
            t.start()

    def _work(self, conn: psycopg.Connection) -> None:
        while True:
            batch = self.queue.get()
            if batch is None:
                return
            if self.error is None:
                try:
                    with conn.cursor() as cur:
                        batch.write(cur)
                    conn.commit()
                    self.progress.advance(runs=batch.runs + batch.skipped,
                                          points=batch.points)
                except BaseException as e:  # noqa: BLE001 - handed to the main thread
                    self.error = e

    def submit(self, batch) -> None:
        if self.error is not None:
            raise self.error
        if not batch.copies:
            self.progress.advance(runs=batch.skipped)
            return
        self.queue.put(batch)

    def close(self) -> None:
        """Waits for every submitted batch, then closes the connections."""
        for _ in self.threads:
            self.queue.put(None)
        for t in self.threads:
            t.join()
        for c in self.conns:
            c.close()
        if self.error is not None:
            raise self.error

    def abort(self) -> None:
        """After an interruption: the batches in flight roll back with their connections."""
        self.error = self.error or KeyboardInterrupt()
        for c in self.conns:
            try:
                c.cancel_safe()
            except Exception:  # noqa: BLE001 - best effort while stopping
                pass
