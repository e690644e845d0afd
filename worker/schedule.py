"""Periodic fine-tuning: at every tick of ROI_TRAIN_SCHEDULE (a cron expression), request training for
every project the backend knows (one that ran /setup).

It runs as a thread in each train-queue worker. Requests go through the same unique job id as
START_TRAINING and the every-N-annotations trigger (`finetune-<project>`), so two schedulers firing at
once, or a schedule firing while a run is in progress, never start a second training. (RQ's own cron
enqueues pickled jobs, which our JSON-only queues do not accept.)
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import UTC, datetime

import redis
from croniter import croniter

from backend.project_state import known_projects
from backend.webhooks import request_training

log = logging.getLogger(__name__)


def request_scheduled_trainings(connection: redis.Redis) -> dict[int, dict]:
    return {
        project: request_training(connection, project, "schedule") for project in known_projects(connection)
    }


class TrainingSchedule(threading.Thread):
    def __init__(self, connection: redis.Redis, expression: str):
        if not croniter.is_valid(expression):
            raise ValueError(f"ROI_TRAIN_SCHEDULE {expression!r} is not a cron expression (e.g. '0 3 * * *')")
        super().__init__(name="training-schedule", daemon=True)
        self.connection = connection
        self.expression = expression
        self.stopped = threading.Event()

    def run(self) -> None:
        ticks = croniter(self.expression, datetime.now(UTC))
        while not self.stopped.is_set():
            due = ticks.get_next(float)
            if self.stopped.wait(max(0.0, due - time.time())):
                return
            try:
                requested = request_scheduled_trainings(self.connection)
                log.info("scheduled training requested for projects %s", sorted(requested))
            except redis.RedisError as error:  # Redis away at this tick: the next one tries again
                log.warning("scheduled training not requested: %s", error)

    def stop(self) -> None:
        self.stopped.set()
