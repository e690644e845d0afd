"""The annotator's wait for a caption (issue 8); prints one JSON line.

One process starts the whole product (devstack.stack: Label Studio 1.23.2, the backend, Redis, one worker
serving --model, default models/demo) on a project of synthetic images, then measures:

- through Label Studio: POST /api/ml/{id}/interactive-annotating, what the labeling UI sends after a box is
  drawn with the smart tool (LS -> backend /predict -> interactive queue -> worker, which fetches the image
  from LS -> back), one call at a time, each a new box (so no cached job answers it);
- in-process: the same captions from a RegionEngine of the same model in this process, for the same
  boxes in the same order (so its image-feature cache warms the same way as the worker's);
- added: through Label Studio minus in-process, at p50 and p95. Target: at most 50 ms at p50;
- where it goes: the same calls sent straight to the backend's /predict (Label Studio's share is the
  difference), and the download of each image from Label Studio, which a job pays when the worker has
  not fetched that image in the last minute (backend/images.py: RecentImages);
- the same calls through Label Studio again, each on a new connection: a check on the dev stack's fix
  for Django's development server (devstack/label_studio_server.py), which without it answers every
  request on a kept-alive connection about 40 ms late; the two figures should be close.

Both sides run torch on --threads threads (default 1: the worker, Label Studio and this process share the
machine's cores). The JSON line also carries the machine's load average before and after, since other work
on a shared machine lengthens every figure. Progress goes to stderr.
"""

# ruff: noqa: E402  (sys.path is fixed before the other imports, see below)
from __future__ import annotations

import sys
from pathlib import Path

# Run as a script (`python benchmarks/interactive.py`, as `make bench` does), this file's folder comes first
# on sys.path, and benchmarks/queue.py would hide the standard library's `queue`, which redis-py imports.
sys.path = [entry for entry in sys.path if Path(entry or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any, TypeVar

import requests
import torch
from PIL import Image, ImageOps

from backend.labeling import Prompts
from backend.ls_client import LabelStudioClient
from devstack.label_studio import LabelStudio, copy_data_template, ensure_venv
from devstack.provision import (
    LOCAL_FILES_PREFIX,
    drawn_rectangle,
    ensure_project,
    ensure_world,
    held_back,
    import_model,
    world_records,
    world_tasks,
)
from devstack.stack import REPO_ROOT, LogLines, Stack
from roi_contract.describe import DescribeRequest
from roi_model.engine import RegionEngine
from roi_model.loading import resolve_device, resolve_dtype
from worker.jobs import engine_request
from worker.registry import ModelRegistry

DEFAULT_MODEL = REPO_ROOT / "models" / "demo"
CAPTION_CONFIG = REPO_ROOT / "labeling_configs" / "region_captioning.xml"
TARGET_ADDED_P50_MS = 50.0
T = TypeVar("T")
MAX_NEW_TOKENS = 48  # backend.settings.Settings.max_new_tokens: what the backend asks for


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def percentiles(values: list[float]) -> dict[str, float]:
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return {
        "p50": round(statistics.median(values), 1),
        "p95": round(cuts[94], 1),
        "max": round(max(values), 1),
    }


class Calls:
    """The boxes to caption: every object of every image, image by image, as an annotator would go."""

    def __init__(self, world: Path, task_ids: dict[str, int], count: int) -> None:
        records = list(world_records(world).values())
        self.items = []
        for record in records:
            for index in range(len(record["regions"])):
                self.items.append((record, index, task_ids[record["id"]]))
        if count > len(self.items):
            raise SystemExit(f"--calls {count} is more than the {len(self.items)} objects of the world")
        self.items = self.items[:count]
        self.world = world

    @staticmethod
    def describe_request(record: dict, index: int) -> dict:
        """The describe job the backend makes for that box (DESIGN.md, "Data contracts")."""
        x1, y1, x2, y2 = record["regions"][index]
        width, height = record["width"], record["height"]
        return {
            "image": {"url": record["image"], "task_id": None},
            "regions": [{"id": "r1", "box": [x1 / width, y1 / height, x2 / width, y2 / height]}],
            "questions": [{"id": "r1:caption", "text": Prompts().caption, "regions": ["r1"]}],
            "max_new_tokens": MAX_NEW_TOKENS,
        }


def timed(function: Callable[..., T], *args: Any, **kwargs: Any) -> tuple[float, T]:
    """Milliseconds that function(*args, **kwargs) takes, and what it returned."""
    started = time.perf_counter()
    text = function(*args, **kwargs)
    return (time.perf_counter() - started) * 1000, text


def through_label_studio(
    client: LabelStudioClient, ml_backend: int, calls: Calls, warmup: int
) -> tuple[list[float], list[str]]:
    def caption(record: dict, index: int, task_id: int, number: int) -> str:
        drawn = drawn_rectangle(record, index, f"bench-{number}")
        reply = client.interactive_annotating(ml_backend, task_id, [drawn])
        if "errors" in reply:
            raise SystemExit(f"Label Studio answered with errors: {reply['errors']}")
        return next(
            item["value"]["text"][0] for item in reply["data"]["result"] if item["type"] == "textarea"
        )

    latencies, texts = [], []
    for number, (record, index, task_id) in enumerate(calls.items):
        milliseconds, text = timed(caption, record, index, task_id, number)
        if number >= warmup:
            latencies.append(milliseconds)
            texts.append(text)
    return latencies, texts


def through_label_studio_on_new_connections(
    label_studio: LabelStudio, ml_backend: int, calls: Calls, warmup: int
) -> list[float]:
    """The interactive calls again (new box ids, so no cached job answers them), one connection each."""
    url = f"{label_studio.url}/api/ml/{ml_backend}/interactive-annotating"
    headers = {"Authorization": f"Token {label_studio.token}", "Connection": "close"}
    latencies = []
    for number, (record, index, task_id) in enumerate(calls.items):
        body = {"task": task_id, "context": {"result": [drawn_rectangle(record, index, f"fresh-{number}")]}}
        milliseconds, response = timed(requests.post, url, json=body, headers=headers, timeout=120)
        response.raise_for_status()
        if "errors" in response.json():
            raise SystemExit(f"Label Studio answered with errors: {response.json()['errors']}")
        if number >= warmup:
            latencies.append(milliseconds)
    return latencies


def direct_to_backend(
    stack: Stack, project: int, label_config: str, tasks: dict[int, dict], calls: Calls, warmup: int
) -> list[float]:
    """The same boxes sent straight to the backend's /predict, as Label Studio sends them (no Label Studio)."""
    session = requests.Session()
    latencies = []
    for number, (record, index, task_id) in enumerate(calls.items):
        body = {
            "tasks": [tasks[task_id]],
            "project": f"{project}.0",
            "label_config": label_config,
            "params": {
                "login": None,
                "password": None,
                "context": {"result": [drawn_rectangle(record, index, f"direct-{number}")]},
            },
        }
        milliseconds, _ = timed(session.post, f"{stack.backend_url}/predict", json=body, timeout=60)
        if number >= warmup:
            latencies.append(milliseconds)
    return latencies


def image_fetches(label_studio: LabelStudio, calls: Calls, warmup: int) -> list[float]:
    """What the worker's download of each task image from Label Studio takes (same URL, same token)."""
    session = requests.Session()
    headers = {"Authorization": f"Token {label_studio.token}"}
    latencies = []
    for number, (record, _, _) in enumerate(calls.items):
        url = f"{label_studio.url}{LOCAL_FILES_PREFIX}world/{record['image']}"
        milliseconds, response = timed(session.get, url, headers=headers, timeout=30)
        response.raise_for_status()
        if number >= warmup:
            latencies.append(milliseconds)
    return latencies


def in_process(model_dir: Path, calls: Calls, warmup: int) -> tuple[list[float], list[str], str]:
    device = resolve_device("auto")
    engine = RegionEngine.from_pretrained(model_dir, device=str(device), dtype=resolve_dtype("auto", device))
    latencies, texts = [], []
    for number, (record, index, _) in enumerate(calls.items):
        request = DescribeRequest.model_validate(calls.describe_request(record, index))
        with Image.open(calls.world / record["image"]) as stored:
            image = ImageOps.exif_transpose(stored).convert("RGB")
        milliseconds, [[answer]] = timed(engine.answer, [engine_request(request, image)])
        text = answer.text
        if number >= warmup:
            latencies.append(milliseconds)
            texts.append(text)
    return latencies, texts, str(device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", type=Path, default=DEFAULT_MODEL, help="model directory (default: models/demo)"
    )
    parser.add_argument(
        "--calls", type=int, default=45, help="interactive calls, warm-up included (default 45)"
    )
    parser.add_argument(
        "--warmup", type=int, default=5, help="first calls left out of the figures (default 5)"
    )
    parser.add_argument("--images", type=int, default=12, help="synthetic images in the project (default 12)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on both sides (default 1)")
    args = parser.parse_args(argv)
    if not (args.model / "config.json").is_file():
        print(
            f"benchmarks/interactive.py: no model directory at {args.model} (run `make demo-model`)",
            file=sys.stderr,
        )
        return 2
    if not 0 <= args.warmup < args.calls:
        parser.error("--warmup must be at least 0 and below --calls")

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-interactive-") as temporary:
        root = Path(temporary)
        venv = ensure_venv()
        data_dir = copy_data_template(venv, root / "label-studio")
        version = import_model(root / "models", args.model)
        world = ensure_world(root / "files", "world", args.images, seed=31, exclude=held_back(args.model))
        log_path = root / "stack.log"
        with open(log_path, "w", buffering=1) as log_file:
            lines = LogLines(lambda line: log_file.write(line + "\n"))
            label_studio = LabelStudio(data_dir, root / "files", venv=venv, output=lines.prefixed("studio"))
            threads = {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
            say("starting Label Studio, Redis, the backend and a worker")
            try:
                with Stack(root, root / "models", label_studio, lines=lines, extra_env=threads) as stack:
                    client = stack.client()
                    setup = ensure_project(
                        client,
                        "benchmark: interactive",
                        CAPTION_CONFIG.read_text(),
                        world / "images",
                        world_tasks(world),
                        stack.backend_url,
                    )
                    task_ids = {
                        task["data"]["record_id"]: task["id"] for task in client.get_tasks(setup.project)
                    }
                    calls = Calls(world, task_ids, args.calls)
                    say(f"measuring {args.calls} calls through Label Studio")
                    served, served_texts = through_label_studio(client, setup.ml_backend, calls, args.warmup)
                    say("measuring the same calls through Label Studio on new connections")
                    fresh = through_label_studio_on_new_connections(
                        label_studio, setup.ml_backend, calls, args.warmup
                    )
                    say("measuring the same calls straight to the backend, and the image downloads")
                    tasks = {task["id"]: task for task in client.get_tasks(setup.project)}
                    config = CAPTION_CONFIG.read_text()
                    direct = direct_to_backend(stack, setup.project, config, tasks, calls, args.warmup)
                    fetches = image_fetches(label_studio, calls, args.warmup)
            except BaseException:
                say(f"the stack failed; the end of its log:\n{log_path.read_text()[-4000:]}")
                raise
        say("measuring in-process")
        local, local_texts, device = in_process(
            ModelRegistry(root / "models").path(version), calls, args.warmup
        )

    added = [a - b for a, b in zip(served, local, strict=True)]
    through, engine = percentiles(served), percentiles(local)
    added_p50 = round(through["p50"] - engine["p50"], 1)
    print(
        json.dumps(
            {
                "benchmark": "interactive",
                "model": version,
                "model_dir": str(args.model),
                "device": device,
                "torch_threads": args.threads,
                "calls": len(served),
                "warmup_calls": args.warmup,
                "images": args.images,
                "through_label_studio_ms": through,
                "in_process_ms": engine,
                "added_ms": {"p50": added_p50, "p95": round(through["p95"] - engine["p95"], 1)},
                "added_per_call_median_ms": round(statistics.median(added), 1),
                "through_label_studio_new_connections_ms": percentiles(fresh),
                "added_on_new_connections_p50_ms": round(statistics.median(fresh) - engine["p50"], 1),
                # Where the added time goes, at p50. The direct calls come second, so the worker has every
                # image's features cached by then (the engine's share of them is a few ms at most).
                "straight_to_backend_ms": percentiles(direct),
                "image_download_from_label_studio_ms": percentiles(fetches),
                "breakdown_p50_ms": {
                    "label_studio": round(through["p50"] - statistics.median(direct), 1),
                    "backend_queue_worker_without_engine": round(
                        statistics.median(direct) - engine["p50"], 1
                    ),
                    "engine": engine["p50"],
                },
                "target_added_p50_ms": TARGET_ADDED_P50_MS,
                "meets_target": added_p50 <= TARGET_ADDED_P50_MS,
                "meets_target_on_new_connections": statistics.median(fresh) - engine["p50"]
                <= TARGET_ADDED_P50_MS,
                "same_captions": sum(a == b for a, b in zip(served_texts, local_texts, strict=True)),
                "machine": {
                    "cpus": os.cpu_count(),
                    "load_average_before": [round(value, 2) for value in load_before],
                    "load_average_after": [round(value, 2) for value in os.getloadavg()],
                    "python": platform.python_version(),
                    "torch": torch.__version__,
                },
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
