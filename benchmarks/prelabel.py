"""Bulk pre-labeling at scale (issue 18); prints one JSON line.

One process starts Label Studio 1.23.2 once and, per run, the rest of the product (devstack.stack: Redis,
the backend, N workers on the prelabel queue serving --model, default models/demo), imports a project of
synthetic images whose boxes are already drawn, presses "Retrieve predictions" on all of it through Label
Studio's API (Label Studio sends the whole selection to /predict; the backend cuts it into chunks of
--chunk tasks on the prelabel queue) and waits until every task has the served version's prediction.

Runs: --small tasks on 1 worker, --tasks tasks on 1 worker, --tasks tasks on 2 workers. Per run: tasks/s,
seconds to the first prediction written in Label Studio, peak RSS of each worker (VmHWM). Targets: peak
RSS of the large run within 10 % of the small one (memory does not grow with the selection), 2 workers at
least 1.7x one. Each worker runs torch on --threads threads (default 1); on a machine with fewer free
cores than workers plus Label Studio, the speedup measures the machine. Progress goes to stderr.
"""

# ruff: noqa: E402  (sys.path is fixed before the other imports, see below)
from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path and benchmarks/queue.py would hide the
# standard library's `queue`, which redis-py imports.
sys.path = [entry for entry in sys.path if Path(entry or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import json
import os
import platform
import tempfile
import time

import requests

from devstack.label_studio import LabelStudio, copy_data_template, ensure_venv
from devstack.provision import ensure_project, ensure_world, held_back, import_model, world_tasks
from devstack.stack import REPO_ROOT, LogLines, Stack

DEFAULT_MODEL = REPO_ROOT / "models" / "demo"
CAPTION_CONFIG = REPO_ROOT / "labeling_configs" / "region_captioning.xml"
TARGET_RSS_RATIO = 1.10
TARGET_SPEEDUP = 1.7


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    raise RuntimeError(f"no VmHWM for process {pid}")


def run(
    label_studio: LabelStudio,
    root: Path,
    world: Path,
    tasks: int,
    workers: int,
    args: argparse.Namespace,
    lines: LogLines,
) -> dict:
    name = f"{tasks}-tasks-{workers}-workers"
    env = {
        "OMP_NUM_THREADS": str(args.threads),
        "MKL_NUM_THREADS": str(args.threads),
        "ROI_PRELABEL_CHUNK_TASKS": str(args.chunk),
        "LOG_LEVEL": "WARNING",
    }
    names = {f"prelabel{i + 1}": "prelabel" for i in range(workers)}
    say(f"{name}: starting Redis, the backend and {workers} worker(s)")
    with Stack(
        root / name, root / "models", label_studio, lines=lines, workers=names, extra_env=env
    ) as stack:
        client = stack.client()
        setup = ensure_project(
            client,
            f"benchmark: prelabel {name}",
            CAPTION_CONFIG.read_text(),
            world / "images",
            world_tasks(world)[:tasks],
            stack.backend_url,
        )
        boxes = len(setup.task_ids)  # every imported task carries one prediction: its drawn boxes
        say(f"{name}: Retrieve predictions on {tasks} tasks")
        started = time.monotonic()
        client.retrieve_predictions(setup.project)
        asked = time.monotonic() - started
        first = None
        while True:
            written = client.get_project(setup.project)["total_predictions_number"] - boxes
            now = time.monotonic() - started
            if written and first is None:
                first = now
            if written >= tasks:
                break
            if now > args.timeout:
                raise SystemExit(f"{name}: only {written} of {tasks} predictions after {now:.0f} s")
            time.sleep(0.5)
        seconds = time.monotonic() - started
        progress = requests.get(f"{stack.backend_url}/prelabel/{setup.project}", timeout=10).json()
        result = {
            "tasks": tasks,
            "workers": workers,
            "seconds": round(seconds, 1),
            "tasks_per_s": round(tasks / seconds, 2),
            "first_prediction_s": round(first, 1),
            "retrieve_call_s": round(asked, 1),
            "peak_rss_mib": [peak_rss_mib(stack.pid(worker)) for worker in names],
            "selection": {key: progress[key] for key in ("state", "done", "failed", "chunks", "failures")},
        }
        say(f"{name}: {json.dumps(result)}")
        return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--small", type=int, default=200)
    parser.add_argument("--chunk", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds one run may take")
    parser.add_argument("--only-two-workers", action="store_true", help="skip the 1-worker runs")
    args = parser.parse_args(argv)

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-prelabel-") as temporary:
        root = Path(temporary)
        venv = ensure_venv()
        data_dir = copy_data_template(venv, root / "label-studio")
        import_model(root / "models", args.model)
        say(f"generating a world of {args.tasks} images")
        world = ensure_world(root / "files", "world", args.tasks, seed=41, exclude=held_back(args.model))
        log_path = root / "stack.log"
        with open(log_path, "w", buffering=1) as log_file:
            lines = LogLines(lambda line: log_file.write(line + "\n"))
            label_studio = LabelStudio(data_dir, root / "files", venv=venv, output=lines.prefixed("studio"))
            with label_studio:
                plan = (
                    [(args.tasks, 2)]
                    if args.only_two_workers
                    else [(args.small, 1), (args.tasks, 1), (args.tasks, 2)]
                )
                runs = [
                    run(label_studio, root, world, tasks, workers, args, lines) for tasks, workers in plan
                ]
    summary: dict = {"benchmark": "prelabel", "chunk": args.chunk, "threads": args.threads, "runs": runs}
    if not args.only_two_workers:
        small, large, two = runs
        summary["rss_ratio_large_vs_small"] = round(
            max(large["peak_rss_mib"]) / max(small["peak_rss_mib"]), 3
        )
        summary["speedup_2_vs_1_worker"] = round(two["tasks_per_s"] / large["tasks_per_s"], 2)
        summary["meets_rss_target"] = summary["rss_ratio_large_vs_small"] <= TARGET_RSS_RATIO
        summary["meets_speedup_target"] = summary["speedup_2_vs_1_worker"] >= TARGET_SPEEDUP
    summary.update(
        cpus=os.cpu_count(),
        load_before=[round(x, 2) for x in load_before],
        load_after=[round(x, 2) for x in os.getloadavg()],
        machine=platform.machine(),
    )
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
