"""`roi-worker`: run a worker that serves the region-LLM from the job queues, or check that one is alive.

    roi-worker --queues interactive,prelabel --model-dir /models     serve until SIGTERM
    roi-worker --healthcheck [--name NAME]                          exit 0 while the worker's heartbeat is fresh

The worker refuses to start, with one sentence on stderr and exit code 2, when the registry serves no model
version. Settings (REDIS_URL, MODEL_DIR, LOG_LEVEL, image limits, Label Studio access) come from the
environment through backend.settings; the flags override what they name.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import redis

from backend import heartbeats
from backend.heartbeats import INTERVAL_S, live_workers
from backend.queues import PRIORITY_ORDER, TRAIN, connect
from backend.settings import Settings, SettingsError
from worker.model_host import no_current_version_message
from worker.registry import ModelRegistry

# torch, transformers and the model code are imported only to serve: the container's health check runs
# `roi-worker --healthcheck` every 30 s and should take milliseconds, not seconds.
if TYPE_CHECKING:
    from worker.model_host import ModelHost
    from worker.region_worker import RegionWorker

DTYPES = ("float32", "bfloat16", "float16")
DEFAULT_MAINTENANCE_INTERVAL_S = 60
EXIT_REFUSED = 2  # bad configuration: restarting will not help
EXIT_FAILED = 1


def build_parser(settings: Settings) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="roi-worker", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--queues",
        default="interactive,prelabel",
        help=f"comma-separated queues to serve, always in priority order {', '.join(PRIORITY_ORDER)} "
        "(default: interactive,prelabel)",
    )
    parser.add_argument(
        "--model-dir", type=Path, default=settings.model_dir, help="model registry root (default: MODEL_DIR)"
    )
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available, else cpu)")
    parser.add_argument(
        "--dtype",
        choices=["auto", *DTYPES],
        default="auto",
        help="weights dtype (default auto: bfloat16 on a GPU that has it, float16 on other GPUs, float32 on CPU)",
    )
    parser.add_argument("--name", help="worker name (default: <hostname>-<pid>)")
    parser.add_argument(
        "--maintenance-interval",
        type=int,
        default=DEFAULT_MAINTENANCE_INTERVAL_S,
        help="seconds between re-queueing the jobs of dead workers (default: %(default)s)",
    )
    parser.add_argument(
        "--heartbeat-interval",
        type=float,
        default=INTERVAL_S,
        help="seconds between heartbeats; a job's lease is 12 of them (default: %(default)s)",
    )
    parser.add_argument(
        "--healthcheck",
        action="store_true",
        help="exit 0 when the worker --name (default: a worker on this host) has a fresh heartbeat",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        settings = Settings.from_env()
    except SettingsError as error:
        print(f"roi-worker: {error}", file=sys.stderr)
        return EXIT_REFUSED
    parser = build_parser(settings)
    args = parser.parse_args(argv)
    if args.healthcheck:
        return healthcheck(settings, args.name)
    queues = _queues(parser, args.queues)
    if args.maintenance_interval < 1 or args.heartbeat_interval <= 0:
        parser.error("--maintenance-interval must be at least 1 and --heartbeat-interval above 0")
    registry = ModelRegistry(args.model_dir)
    if registry.current() is None:
        print(f"roi-worker: {no_current_version_message(registry)}", file=sys.stderr)
        return EXIT_REFUSED
    name = args.name or f"{socket.gethostname()}-{os.getpid()}"
    try:
        connection = connect(settings)
        if heartbeats.is_alive(connection, name):
            print(
                f"roi-worker: a live worker named {name!r} is already running; pick another --name",
                file=sys.stderr,
            )
            return EXIT_FAILED
    except redis.RedisError as error:
        print(f"roi-worker: cannot reach Redis: {error}", file=sys.stderr)
        return EXIT_FAILED
    except SettingsError as error:
        print(f"roi-worker: {error}", file=sys.stderr)
        return EXIT_REFUSED

    from roi_model.loading import resolve_device, resolve_dtype
    from worker.logs import configure_logging
    from worker.model_host import ModelHost
    from worker.region_worker import RegionWorker

    try:
        configure_logging(settings.log_level)
    except ValueError as error:
        parser.error(str(error))
    try:
        device = resolve_device(args.device or "auto")
        dtype = resolve_dtype(args.dtype, device)
    except ValueError as error:
        parser.error(str(error))
    host = ModelHost(
        registry,
        device=str(device),
        dtype=dtype,
        connection=connection,
        adapter_cache_bytes=settings.adapter_cache_bytes,
        adapter_ready_bytes=settings.adapter_ready_bytes,
        merge_project=settings.merge_project,
    )
    try:
        worker = RegionWorker(
            queues,
            host=host,
            connection=connection,
            name=name,
            heartbeat_interval_s=args.heartbeat_interval,
            maintenance_interval=args.maintenance_interval,
        )
    except redis.RedisError as error:
        print(f"roi-worker: cannot reach Redis: {error}", file=sys.stderr)
        return EXIT_FAILED
    return serve(worker, host, settings, queues)


def serve(worker: RegionWorker, host: ModelHost, settings: Settings, queues: list[str]) -> int:
    """Load the model (the heartbeat says "loading" meanwhile), then work until a stop signal.

    A worker of the train queue alone loads no inference model (fine-tuning loads its own) and, with
    ROI_TRAIN_SCHEDULE set, requests trainings on that schedule.
    """
    from worker.model_host import NoModelServed
    from worker.process_context import WorkerContext, activate
    from worker.schedule import TrainingSchedule

    schedule = (
        TrainingSchedule(worker.connection, settings.train_schedule)
        if TRAIN in queues and settings.train_schedule
        else None
    )

    importlib.import_module("worker.jobs")  # RQ would import it at the first job, making that one slow
    # Until RQ installs its own handlers, SIGTERM ends the load through `finally` (heartbeat removed).
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    worker.pulse.start()
    if schedule is not None:
        schedule.start()
    try:
        serves_model = bool(set(queues) - {TRAIN})
        if serves_model:
            host.load()
        activate(WorkerContext(settings, worker.connection, host if serves_model else None))
        worker.work_until_stopped(settings.log_level)
    except NoModelServed as error:
        print(f"roi-worker: {error}", file=sys.stderr)
        return EXIT_REFUSED
    except redis.RedisError as error:
        print(f"roi-worker: lost Redis: {error}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        activate(None)
        worker.pulse.stop()
        if schedule is not None:
            schedule.stop()
    return 0


def healthcheck(settings: Settings, name: str | None) -> int:
    """0 when the worker `name` (or, without a name, any worker on this host) has a fresh heartbeat."""
    if not settings.redis_url:
        print("unhealthy: REDIS_URL is not set")
        return EXIT_FAILED
    connection = redis.Redis.from_url(settings.redis_url, socket_timeout=5.0, socket_connect_timeout=5.0)
    try:
        workers = live_workers(connection)
    except redis.RedisError as error:
        print(f"unhealthy: Redis does not answer ({type(error).__name__}: {error})")
        return EXIT_FAILED
    finally:
        connection.close()
    hostname = socket.gethostname()
    mine = [w for w in workers if (w.get("name") == name if name else w.get("host") == hostname)]
    if not mine:
        print(
            f"unhealthy: no fresh heartbeat from {f'worker {name!r}' if name else f'a worker on {hostname}'}"
        )
        return EXIT_FAILED
    for worker in mine:
        print(f"healthy: {worker['name']} serves model {worker.get('model_version')} ({worker.get('state')})")
    return 0


def _queues(parser: argparse.ArgumentParser, value: str) -> list[str]:
    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in names if name not in PRIORITY_ORDER]
    if unknown or not names:
        parser.error(f"--queues {value!r}: the queues are {', '.join(PRIORITY_ORDER)}")
    if TRAIN in names and len(set(names)) > 1:
        parser.error(
            f"--queues {value!r}: the train queue needs a worker of its own (a fine-tune holds its worker for "
            "minutes to hours, and every box drawn meanwhile would wait): start another roi-worker --queues train"
        )
    return [name for name in PRIORITY_ORDER if name in names]


if __name__ == "__main__":
    sys.exit(main())
