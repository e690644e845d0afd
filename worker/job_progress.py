"""A long job's progress in its RQ meta, {"progress": {"stage", ...}}, for whoever polls the job.

Progress is a courtesy to the person waiting: a Redis hiccup while saving it is logged and never fails
the job. Outside a worker (no current job) nothing is recorded.
"""

from __future__ import annotations

import logging
from typing import Any

import redis
from rq import get_current_job

log = logging.getLogger(__name__)


class JobProgress:
    def __init__(self) -> None:
        self.job = get_current_job()

    def report(self, stage: str, **fields: Any) -> None:
        if self.job is None:
            return
        self.job.meta["progress"] = {"stage": stage, **fields}
        try:
            self.job.save_meta()
        except redis.RedisError as error:
            log.warning("could not save the progress of job %s: %s", self.job.id, error)
