"""Time the synthetic world: generate N images (default 1000) and print one JSON line."""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from roi_model.synthetic import generate_world


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        summary = generate_world(Path(out), args.images, args.seed)
        seconds = time.perf_counter() - started
        megabytes = sum(path.stat().st_size for path in Path(out).rglob("*") if path.is_file()) / 1e6
    print(
        json.dumps(
            {
                "benchmark": "synthetic_world",
                "images": args.images,
                "seconds": round(seconds, 2),
                "ms_per_image": round(1000 * seconds / max(args.images, 1), 2),
                "megabytes": round(megabytes, 1),
                "summary": asdict(summary),
            }
        )
    )


if __name__ == "__main__":
    main()
