"""What serving per-project LoRA adapters costs (issue 22); prints one JSON line.

In one process, a worker's model host (worker.model_host.ModelHost) on a registry holding --model (default
models/demo) as the base and 16 projects, each with a LoRA adapter of rank --rank on every linear layer of
the language model (as a project's fine-tune trains them; the weights are random and small, so answers keep
the base's length and the figures measure the adapter's cost alone). Interactive calls, one new box each
on a few images (what an annotator's drawing sends: the image features are cached after an image's first
box), are timed with:

- the base alone (a host that never loaded an adapter, answering projects that never trained);
- 1, 4 and 16 adapters in rotation: call i is answered for project i mod N, so every call switches adapter;
- the base from the host that holds the 16 adapters (their layers switched off), for projects that never
  trained;
- 16 in rotation on a host whose ready weights hold one adapter (ROI_ADAPTER_READY_BYTES=1, as a model
  too large for more would): every switch computes the next adapter's weights again.

Configurations are interleaved round by round, so a load that other work puts on a shared machine falls on
all of them alike. Target: at most 10 % added at p50 with 16 adapters over the base alone. Also reported:
each adapter's weights in bytes (the cache's measure, ROI_ADAPTER_CACHE_BYTES) and on disk, its ready weights
(ROI_ADAPTER_READY_BYTES; all 16 fit in the default), the process's
resident memory added by loading the 16, and the adapter load time (first call of a project) at p50 and max.
torch runs on --threads threads (default 1, as a worker beside other processes). Progress goes to stderr.
"""

# ruff: noqa: E402  (sys.path is fixed before the other imports, see below)
from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path, and benchmarks/queue.py would hide the
# standard library's `queue`.
sys.path = [entry for entry in sys.path if Path(entry or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.unit.tiny_adapters makes the adapters

import argparse
import json
import os
import platform
import random
import statistics
import tempfile
import time

import torch
from PIL import Image

from roi_model.engine import ImageRequest, RegionQuery
from roi_model.families import load_region_model
from roi_model.generation import GenerationOptions
from roi_model.synthetic import generate_world
from roi_model.training import read_records
from tests.unit.tiny_adapters import random_adapter
from worker.model_host import ModelHost
from worker.registry import ModelRegistry

ROOT = Path(__file__).resolve().parents[1]
ROTATIONS = (1, 4, 16)


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def build_registry(root: Path, model: Path, projects: int, rank: int) -> ModelRegistry:
    registry = ModelRegistry(root / "models")
    registry.import_model(model, version="base")
    language_model = load_region_model(model).model.language_model
    for project in range(1, projects + 1):
        adapter = random_adapter(
            language_model, root / f"adapter-{project}", seed=project, rank=rank, scale=0.02
        )
        lineage = registry.lineage(project)
        lineage.promote(lineage.publish(adapter, extra={"base": "base", "project": project}))
    return registry


def images_of(world: Path) -> list[Image.Image]:
    return [
        Image.open(world / record["image"]).convert("RGB") for record in read_records([world / "data.jsonl"])
    ]


def new_box(rng: random.Random) -> list[float]:
    x1, y1 = rng.uniform(0, 0.6), rng.uniform(0, 0.6)
    return [x1, y1, x1 + rng.uniform(0.15, 0.4), y1 + rng.uniform(0.15, 0.4)]


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "demo")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--calls", type=int, default=32, help="calls per configuration and round")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    options = GenerationOptions(max_new_tokens=16)

    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        print("building the registry", file=sys.stderr)
        registry = build_registry(root, args.model, max(ROTATIONS), args.rank)
        generate_world(root / "world", args.images, seed=7)
        images = images_of(root / "world")
        base_host = ModelHost(registry)
        base_host.load()
        host = ModelHost(registry)
        host.load()
        before_adapters = resident_bytes()
        for project in range(1, max(ROTATIONS) + 1):
            host.serve(project)  # the first call of a project loads its adapter
        after_adapters = resident_bytes()
        adapter_bytes = host.adapter_stats()["bytes"] // max(ROTATIONS)
        on_disk = sum(
            path.stat().st_size
            for path in registry.lineage(1).path("v1").iterdir()
            if path.suffix == ".safetensors"
        )

        never_trained = list(range(max(ROTATIONS) + 1, 2 * max(ROTATIONS) + 1))  # served the base
        configurations = {"base": (base_host, never_trained)}
        configurations |= {f"rotation_{n}": (host, list(range(1, n + 1))) for n in ROTATIONS}
        configurations["base_beside_16_adapters"] = (host, never_trained)
        # where one adapter's ready weights alone fill ROI_ADAPTER_READY_BYTES (a large model): every switch
        # computes W + scale * B @ A again
        rewriting = ModelHost(registry, adapter_ready_bytes=1)
        rewriting.load()
        trained = list(range(1, max(ROTATIONS) + 1))
        configurations["rotation_16_ready_weights_rewritten"] = (rewriting, trained)
        timings: dict[str, list[float]] = {name: [] for name in configurations}
        rng = random.Random(0)
        for round_ in range(args.rounds + 1):  # round 0 warms every cache and is not counted
            for name, (chosen, projects) in configurations.items():
                for call in range(args.calls):
                    image = images[call % len(images)]
                    request = ImageRequest(
                        image, [RegionQuery("Describe <region1> briefly.", [new_box(rng)])], options
                    )
                    started = time.perf_counter()
                    engine, _ = chosen.serve(projects[call % len(projects)])
                    engine.answer([request])
                    if round_:
                        timings[name].append((time.perf_counter() - started) * 1000)
            print(f"round {round_} done", file=sys.stderr)

    p50 = {name: round(statistics.median(values), 2) for name, values in timings.items()}
    p95 = {name: round(percentile(values, 0.95), 2) for name, values in timings.items()}
    loads = host.adapter_load_seconds
    result = {
        "benchmark": "adapters",
        "model": str(args.model.relative_to(ROOT) if args.model.is_relative_to(ROOT) else args.model),
        "lora_rank": args.rank,
        "calls_per_configuration": args.rounds * args.calls,
        "interactive_p50_ms": p50,
        "interactive_p95_ms": p95,
        "added_at_p50": {name: round(p50[name] / p50["base"] - 1, 4) for name in p50 if name != "base"},
        "target_added_at_16": 0.10,
        "adapter_weight_bytes": adapter_bytes,
        "adapter_file_bytes": on_disk,
        "ready_weight_bytes_per_adapter": host.adapter_stats()["ready_bytes"] // max(ROTATIONS),
        "resident_bytes_added_per_adapter": (after_adapters - before_adapters) // max(ROTATIONS),
        "adapter_load_ms": {
            "p50": round(statistics.median(loads) * 1000, 2),
            "max": round(max(loads) * 1000, 2),
            "count": len(loads),
        },
        "adapter_loads_during_rotation": host.adapter_loads - max(ROTATIONS),
        "threads": args.threads,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "load_average": os.getloadavg()[0],
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
