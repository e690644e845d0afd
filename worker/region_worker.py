"""The RQ worker that serves the region-LLM: one process per GPU, the model loaded once, jobs run in-process.

`RegionWorker` is an rq.SimpleWorker (CUDA does not survive a fork, reliability.md §1.3) with what a
long-lived model server needs on top:

* Before each job it serves the registry's current model version (ModelHost.refresh): a promotion reaches
  the next job without a restart.
* Every job runs under a finite timeout: one enqueued without a timeout (or with -1) gets its queue's.
* Retries only for transient failures (worker/failures.py). RQ retries any exception of a job that carries
  Retry; a permanent one (bad box, not an image, URL not allowed) is failed at once, keeping its retries.
* A pulse thread beats every `heartbeat_interval_s`, while a job runs too. Each beat writes the heartbeat
  key the backend's /health reads (backend.heartbeats: model version, queues, host, pid, device, state, job)
  and extends the lease of the job in hand in RQ's started registry. SimpleWorker alone leases a job for its
  whole timeout plus 60 s, so the job of a killed worker would wait up to 16 min (prelabel) before another
  worker's maintenance re-queues it; with the pulse the lease is LEASE_BEATS beats (60 s by default).
* Maintenance (which re-queues abandoned jobs) runs every `maintenance_interval` seconds, also while the
  worker waits for jobs: RQ runs it only between dequeues, so the blocking dequeue is no longer than that.
* SIGTERM: RQ's warm shutdown (the job in hand finishes, no new one starts); the heartbeat key is removed on
  the way out. A second SIGTERM is a cold shutdown; the job then comes back through its lease.
* Redis trouble of any kind (refused connections, timeouts, a failover, LOADING after a restart, OOM at
  maxmemory, READONLY) never ends the worker: RQ's loop gives up on most of them, so `work_until_stopped`
  waits with backoff until Redis accepts writes again and enters the loop anew. The model stays loaded; a
  job cut short by the outage comes back through its lease.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import redis
from rq import Queue, SimpleWorker
from rq.exceptions import StopRequested
from rq.job import Job
from rq.utils import now, utcformat
from rq.worker import WorkerStatus

from backend.heartbeats import INTERVAL_S, beat, forget, prune
from backend.queues import QUEUES, SERIALIZER, SOCKET_TIMEOUT_S, TRAIN
from worker.failures import is_transient
from worker.model_host import ModelHost

log = logging.getLogger(__name__)

# A job's lease lasts this many beats: long enough to ride out a slow beat, short enough that a dead
# worker's job is picked up again within about a minute.
LEASE_BEATS = 12
# Backoff while Redis refuses writes: first wait, doubled up to the cap.
RECOVERY_FIRST_WAIT_S = 0.5
RECOVERY_MAX_WAIT_S = 10.0
RECOVERY_RESET_S = 60.0  # a work loop that ran this long had recovered


class RegionWorker(SimpleWorker):
    def __init__(
        self,
        queues: Sequence[str],
        *,
        host: ModelHost,
        connection: redis.Redis,
        name: str,
        maintenance_interval: int,
        heartbeat_interval_s: float = INTERVAL_S,
        **kwargs: Any,
    ) -> None:
        if heartbeat_interval_s <= 0:
            raise ValueError(f"the heartbeat interval must be positive, got {heartbeat_interval_s}")
        self.host = host
        self.lease_s = max(1, math.ceil(LEASE_BEATS * heartbeat_interval_s))
        self.stop_requested_by_signal = False
        super().__init__(
            list(queues),
            connection=connection,
            name=name,
            serializer=SERIALIZER,
            maintenance_interval=maintenance_interval,
            **kwargs,
        )
        self.pulse = Pulse(
            connection, name, heartbeat_interval_s, report=self.report, on_beat=self.extend_leases
        )

    # --- what the backend sees -------------------------------------------------------------------------

    def report(self) -> dict:
        """The heartbeat's content."""
        if self.host.loading:
            state = "loading"
        elif self.stop_requested_by_signal:
            state = "stopping"
        else:
            state = str(getattr(self.get_state(), "value", self.get_state()))
        executions = list(self.executions.values())
        return {
            "model_version": self.host.served_version,
            "queues": self.queue_names(),
            "host": self.hostname,
            "pid": self.pid,
            "device": self.host.device,
            "state": state,
            "job": executions[0].job_id if executions else None,
        }

    def extend_leases(self) -> None:
        """Keep RQ's records of this worker and of the job in hand alive (called by the pulse thread)."""
        if self.birth_date is None:
            return  # not registered with RQ yet (the model is loading): nothing to keep alive
        executions = list(self.executions.values())
        with self.connection.pipeline() as pipeline:
            self.heartbeat(pipeline=pipeline)
            for execution in executions:
                execution.heartbeat(execution.job.started_job_registry, self.lease_s, pipeline=pipeline)
            pipeline.execute()

    # --- RQ hooks --------------------------------------------------------------------------------------

    @property
    def dequeue_timeout(self) -> int:
        # A blocking pop longer than the client's socket timeout fails with a read timeout, which RQ logs as
        # an ERROR and retries: an idle worker must block for less than backend.queues.SOCKET_TIMEOUT_S.
        ceiling = int(SOCKET_TIMEOUT_S - 5)
        return max(1, min(super().dequeue_timeout, int(self.maintenance_interval), ceiling))

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        return self.lease_s  # the pulse renews it; see the module docstring

    def register_birth(self) -> None:
        if self.connection.exists(self.key) and not self.connection.hexists(self.key, "death"):
            # RQ's record of a worker of this name that died without saying so (SIGKILL, OOM, lost machine).
            # worker.main checked that no heartbeat of that name is fresh, so the name is free again.
            log.warning("worker %s: replacing the record of a previous worker of that name", self.name)
            self.connection.hset(self.key, "death", utcformat(now()))
        super().register_birth()

    def execute_job(self, job: Job, queue: Queue) -> None:
        if job.timeout is None or job.timeout <= 0:
            job.timeout = QUEUES[queue.name].job_timeout if queue.name in QUEUES else Queue.DEFAULT_TIMEOUT
        if queue.name != TRAIN and self.host.stale():
            # A stop signal during the reload must wait for this job, which is already off its queue.
            # (Fine-tuning loads its own models: a trainer holds no inference model.)
            self.set_state(WorkerStatus.BUSY)
            self.host.refresh()
        log.info(
            "job started",
            extra={
                "job": job.id,
                "func": job.func_name,
                "queue": queue.name,
                "model_version": self.host.served_version,
            },
        )
        started = time.monotonic()
        super().execute_job(job, queue)
        log.info("job ended", extra={"job": job.id, "seconds": round(time.monotonic() - started, 4)})

    def handle_exception(self, job: Job, *exc_info: Any) -> None:
        error = exc_info[1] if len(exc_info) > 1 else None
        transient = error is not None and is_transient(error)
        if not transient and job.retries_left:
            job.retries_left = 0  # read by handle_job_failure, which RQ calls next
        log.warning(
            "job failed",
            extra={
                "job": job.id,
                "reason": f"{type(error).__name__}: {error}" if error is not None else "unknown",
                "transient": transient,
                "will_retry": bool(job.should_retry),
            },
        )
        super().handle_exception(job, *exc_info)

    def request_stop(self, signum: int, frame: Any) -> None:
        self.stop_requested_by_signal = True
        super().request_stop(signum, frame)

    def work_until_stopped(self, logging_level: str) -> None:
        """RQ's work loop until a stop signal, entered again whenever Redis trouble ended it."""
        delay = RECOVERY_FIRST_WAIT_S
        while True:
            started = time.monotonic()
            try:
                self.work(logging_level=logging_level)
                problem = "RQ's work loop ended"
            except StopRequested:
                return
            except redis.RedisError as error:  # outside RQ's own loop: its bootstrap or its teardown
                problem = f"{type(error).__name__}: {error}"
            if self.stop_requested_by_signal or self._stop_requested:
                return
            if time.monotonic() - started > RECOVERY_RESET_S:
                delay = RECOVERY_FIRST_WAIT_S  # it had recovered: a new outage starts the backoff anew
            log.warning("worker paused: %s; waiting for Redis to accept writes again", problem)
            try:
                self._pause(delay)
                self._wait_for_writable_redis(delay)
            except StopRequested:
                return
            delay = min(delay * 2, RECOVERY_MAX_WAIT_S)
            log.warning("worker resumed: Redis accepts writes again")

    def _wait_for_writable_redis(self, delay: float) -> None:
        """Probe Redis with a write until one succeeds, backing off."""
        probe = f"roi:probe:{self.name}"
        while True:
            try:
                self.connection.set(probe, "1", ex=10)
                self.connection.delete(probe)
                return
            except redis.RedisError as error:
                log.info("Redis does not accept writes yet (%s: %s)", type(error).__name__, error)
            delay = min(delay * 2, RECOVERY_MAX_WAIT_S)
            self._pause(delay)

    def _pause(self, seconds: float) -> None:
        """Sleep, but end at once (StopRequested) when a stop signal arrives."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.stop_requested_by_signal or self._stop_requested:
                raise StopRequested()
            time.sleep(min(0.2, seconds))


class Pulse:
    """A daemon thread that writes the heartbeat key every `interval_s` and then calls `on_beat`.

    Redis outages are logged once and ridden out: the next beat after Redis returns writes the key again.
    `stop()` ends the thread and deletes the key (a clean exit is not a death).
    """

    def __init__(
        self,
        connection: redis.Redis,
        name: str,
        interval_s: float,
        *,
        report: Callable[[], dict],
        on_beat: Callable[[], None] | None = None,
    ) -> None:
        self.connection = connection
        self.name = name
        self.interval_s = interval_s
        self.report = report
        self.on_beat = on_beat
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing = False

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name=f"pulse-{self.name}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=self.interval_s + 5)
        try:
            forget(self.connection, self.name)
        except redis.RedisError as error:
            log.warning("could not remove the heartbeat of %s: %s", self.name, error)

    def beat_once(self) -> None:
        try:
            beat(self.connection, self.name, self.report())
            prune(self.connection)
            if self.on_beat is not None:
                self.on_beat()
        except redis.RedisError as error:
            if not self._failing:
                log.warning("heartbeat failed, Redis unreachable (%s); retrying every beat", error)
            self._failing = True
            return
        except Exception:
            log.exception("heartbeat failed")
            return
        if self._failing:
            log.warning("heartbeat restored, Redis reachable again")
            self._failing = False

    def _run(self) -> None:
        while True:
            self.beat_once()
            if self._stopped.wait(self.interval_s):
                return
