"""Queue overhead of the describe job and worker throughput (issue 5); prints one JSON line.

On a tiny random model (so that the model's own time is small and the queue's shows), one process measures:

- in-process: `worker.jobs.describe_regions(request)` called directly, the latency of each call;
- queued: the same request enqueued on the interactive queue of a real redis-server, answered by one real
  `python -m worker.main` process, waited for with `backend.queues.wait_for_result` (one job at a time);
- overhead: queued minus in-process, at the median and at the 99th percentile (target: median <= 10 ms);
- throughput: --throughput-jobs jobs enqueued at once, answered by 1 worker, then by 2 workers.

Every process runs torch on --threads threads (default 1: on a small machine, several processes whose
OpenMP threads spin against each other measure the contention, not the queue). Progress goes to stderr.
"""

# ruff: noqa: E402  (sys.path is fixed before the other imports, see below)
from __future__ import annotations

import sys
from pathlib import Path

# Run as a script (`python benchmarks/queue.py`, as `make bench` does), this file's folder comes first on
# sys.path and this file would hide the standard library's `queue`, which redis-py imports.
sys.path = [entry for entry in sys.path if Path(entry or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time

import numpy as np
import torch
from PIL import Image

from backend.heartbeats import live_workers
from backend.queues import INTERACTIVE, connect, enqueue, wait_for_result
from backend.settings import Settings
from devstack.redis_server import EmbeddedRedis
from roi_model.assembly import build_model, save_pretrained
from roi_model.presets import tiny_config
from roi_model.word_tokenizer import train_word_tokenizer
from worker.registry import ModelRegistry

REPO_ROOT = Path(__file__).resolve().parents[1]
WORDS = ["describe briefly a large small red green blue circle square triangle", "what colour shape is left"]


def request(box_shift: float = 0.0) -> dict:
    return {
        "image": {"url": "scene.png", "task_id": 1},
        "regions": [{"id": "r1", "box": [0.1 + box_shift, 0.2, 0.6, 0.7]}],
        "questions": [{"id": "r1:caption", "text": "Describe <region1> briefly.", "regions": ["r1"]}],
        "max_new_tokens": 4,
    }


def percentile(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def prepare(root: Path) -> tuple[ModelRegistry, Path]:
    torch.manual_seed(0)
    model, processor = build_model(tiny_config("clip"), train_word_tokenizer(WORDS))
    save_pretrained(model.eval(), processor, root / "tiny")
    registry = ModelRegistry(root / "models")
    registry.import_model(root / "tiny", version="v1")
    files = root / "files"
    files.mkdir()
    pixels = np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(files / "scene.png")
    return registry, files


def in_process_latencies(registry: ModelRegistry, calls: int) -> list[float]:
    from worker.jobs import describe_regions
    from worker.model_host import ModelHost
    from worker.process_context import WorkerContext, activate

    host = ModelHost(registry)
    host.load()
    activate(WorkerContext(Settings.from_env(), host=host))
    try:
        for _ in range(10):
            describe_regions(request())
        latencies = []
        for _ in range(calls):
            started = time.perf_counter()
            describe_regions(request())
            latencies.append(time.perf_counter() - started)
        return latencies
    finally:
        activate(None)


def start_worker(name: str, env: dict[str, str], log_dir: Path) -> subprocess.Popen:
    command = [
        sys.executable,
        "-m",
        "worker.main",
        "--name",
        name,
        "--queues",
        INTERACTIVE,
        "--device",
        "cpu",
    ]
    with open(log_dir / f"{name}.log", "wb") as log:
        return subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def wait_ready(connection, names: list[str], processes: list[subprocess.Popen]) -> None:
    deadline = time.monotonic() + 180
    while sum(w["name"] in names and w["state"] == "idle" for w in live_workers(connection)) < len(names):
        if time.monotonic() > deadline or any(p.poll() is not None for p in processes):
            raise RuntimeError(f"workers {names} did not start; see their logs")
        time.sleep(0.05)


def queued_latencies(connection, jobs: int) -> list[float]:
    for _ in range(10):
        wait_for_result(enqueue(connection, INTERACTIVE, "worker.jobs.describe_regions", request()), 60)
    latencies = []
    for _ in range(jobs):
        started = time.perf_counter()
        wait_for_result(enqueue(connection, INTERACTIVE, "worker.jobs.describe_regions", request()), 60)
        latencies.append(time.perf_counter() - started)
    return latencies


def throughput(connection, jobs: int) -> float:
    started = time.perf_counter()
    queued = [
        enqueue(connection, INTERACTIVE, "worker.jobs.describe_regions", request(0.001 * (i % 50)))
        for i in range(jobs)
    ]
    for job in queued:
        wait_for_result(job, 300)
    return jobs / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency-jobs", type=int, default=200)
    parser.add_argument("--throughput-jobs", type=int, default=500)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        registry, files = prepare(root)
        # The workers read their settings from the environment; the in-process run reads the same.
        os.environ["ROI_LOCAL_FILES_ROOT"] = str(files)
        progress(f"in-process: {args.latency_jobs} calls")
        local = in_process_latencies(registry, args.latency_jobs)

        server = EmbeddedRedis(root / "redis").start()
        workers: list[subprocess.Popen] = []
        try:
            env = {
                **os.environ,
                "PYTHONPATH": str(REPO_ROOT),
                "REDIS_URL": server.url,
                "MODEL_DIR": str(registry.root),
                "OMP_NUM_THREADS": str(args.threads),
                "HF_HUB_OFFLINE": "1",
            }
            connection = connect(Settings(redis_url=server.url))
            workers.append(start_worker("bench-1", env, root))
            wait_ready(connection, ["bench-1"], workers)
            progress(f"queued: {args.latency_jobs} jobs, one at a time")
            queued = queued_latencies(connection, args.latency_jobs)
            progress(f"throughput: {args.throughput_jobs} jobs, 1 worker")
            one_worker = throughput(connection, args.throughput_jobs)
            workers.append(start_worker("bench-2", env, root))
            wait_ready(connection, ["bench-1", "bench-2"], workers)
            progress(f"throughput: {args.throughput_jobs} jobs, 2 workers")
            two_workers = throughput(connection, args.throughput_jobs)
        finally:
            for worker in workers:
                worker.terminate()
            for worker in workers:
                worker.wait(timeout=60)
            server.stop()

    median_overhead_ms = 1000 * (statistics.median(queued) - statistics.median(local))
    print(
        json.dumps(
            {
                "benchmark": "queue",
                "median_overhead_ms": round(median_overhead_ms, 2),
                "p99_overhead_ms": round(1000 * (percentile(queued, 99) - percentile(local, 99)), 2),
                "throughput_1_worker_jobs_per_s": round(one_worker, 1),
                "throughput_2_workers_jobs_per_s": round(two_workers, 1),
                "in_process_median_ms": round(1000 * statistics.median(local), 2),
                "in_process_p99_ms": round(1000 * percentile(local, 99), 2),
                "queued_median_ms": round(1000 * statistics.median(queued), 2),
                "queued_p99_ms": round(1000 * percentile(queued, 99), 2),
                "in_process_jobs_per_s": round(len(local) / sum(local), 1),
                "target_median_overhead_ms": 10,
                "target_met": median_overhead_ms <= 10,
                "latency_jobs": args.latency_jobs,
                "throughput_jobs": args.throughput_jobs,
                "torch_threads_per_process": args.threads,
                "cpus": os.cpu_count(),
                "load_average_1m": round(os.getloadavg()[0], 2),
                "machine": platform.machine(),
            }
        )
    )


if __name__ == "__main__":
    main()
