"""What a worker process holds for its jobs: the settings read at start, its Redis connection, its model.

RQ calls a job function by name with JSON arguments only, so what the job needs from its process cannot
travel as an argument. `worker.main` reads the settings once, builds one WorkerContext and `activate`s it
before the first job; job functions take it with `current()`, as RQ's own `get_current_job()`.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis

from backend.settings import Settings
from worker.model_host import ModelHost, NoModelServed


@dataclass(frozen=True)
class WorkerContext:
    settings: Settings
    connection: redis.Redis | None = None
    host: ModelHost | None = None  # None in a worker of the train queue alone: fine-tuning loads its own

    def model(self) -> ModelHost:
        if self.host is None:
            raise NoModelServed("this worker serves no model (it serves the train queue only)")
        return self.host


_active: WorkerContext | None = None


def activate(context: WorkerContext | None) -> None:
    """Make `context` the one job functions of this process use (None: none)."""
    global _active
    _active = context


def current() -> WorkerContext:
    if _active is None:
        raise NoModelServed(
            "no worker context in this process: job functions run inside roi-worker "
            "(or call worker.process_context.activate(WorkerContext(...)) first)"
        )
    return _active
