"""Training sets and benchmarks the gate replays, kept content-addressed beside the model versions.

Layout under $MODEL_DIR/datasets/:

    <sha256>/data.jsonl   a stored dataset: training records (roi_contract.records), one JSON object a
                          line, sorted keys, images referred to as ../images/<name>
    images/<sha256>.<ext> every image of every stored dataset, named by content (stored once)
    benchmarks.json       {name: digest} of the benchmark sets a user registered (`roi-model registry
                          add-benchmark FILE`)

A dataset's digest is roi_contract.records.dataset_digest of its data.jsonl, so the same records give the
same directory however often they are stored (a fine-tune stores its project's train and held-out tasks;
the next fine-tune of the same project stores mostly the same images again, which cost nothing).
A version's card lists the datasets it learned from under "datasets" (worker/finetune.py).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from filelock import FileLock

from backend.atomic_files import write_bytes_atomically
from roi_contract.records import dataset_digest

DATA_FILE = "data.jsonl"


class ReplayStore:
    def __init__(self, model_dir: Path | str) -> None:
        self.root = Path(model_dir) / "datasets"
        self.images_dir = self.root / "images"
        self.benchmarks_file = self.root / "benchmarks.json"

    def store(self, jsonl: Path | str) -> str:
        """Store the records of `jsonl` (images relative to its folder, or absolute); returns the digest."""
        from roi_model.training import read_records  # torch: only when a dataset is stored

        lines = []
        for record in read_records([Path(jsonl)]):
            source = Path(record.pop("_root")) / record["image"]
            record["image"] = f"../images/{self._store_image(source)}"
            lines.append(json.dumps(record, sort_keys=True, ensure_ascii=False))
        data = "".join(line + "\n" for line in lines).encode()
        digest = dataset_digest(data)
        target = self.path(digest)
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            write_bytes_atomically(target, data)
        return digest

    def path(self, digest: str) -> Path:
        """The data.jsonl of a stored dataset (it may not exist)."""
        if not digest.startswith("sha256:") or not all(c in "0123456789abcdef" for c in digest[7:]):
            raise ValueError(f"not a dataset digest: {digest!r}")
        return self.root / digest.removeprefix("sha256:") / DATA_FILE

    def add_benchmark(self, jsonl: Path | str, name: str | None = None) -> dict[str, str]:
        """Register a spatial-instruction JSONL file as a benchmark the gate evaluates every candidate on."""
        name = name or Path(jsonl).stem
        digest = self.store(jsonl)
        if not self.path(digest).read_bytes().strip():
            raise ValueError(f"{jsonl}: no records")
        self.root.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.root / ".lock")):
            benchmarks = {**self.benchmarks(), name: digest}
            write_bytes_atomically(
                self.benchmarks_file, json.dumps(benchmarks, indent=1, sort_keys=True).encode()
            )
        return {"name": name, "digest": digest}

    def benchmarks(self) -> dict[str, str]:
        if not self.benchmarks_file.exists():
            return {}
        return json.loads(self.benchmarks_file.read_text())

    def _store_image(self, source: Path) -> str:
        data = source.read_bytes()
        name = hashlib.sha256(data).hexdigest() + (source.suffix.lower() or ".img")
        target = self.images_dir / name
        if not target.exists():
            self.images_dir.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{name}.tmp")
            shutil.copyfile(source, tmp)
            tmp.replace(target)
        return name


def replay_sets(store: ReplayStore, card: dict[str, Any]) -> dict[str, Path]:
    """The sets the gate replays for the served version `card`: the held-out slice of every dataset it
    learned from, and every registered benchmark; {name the gate's reason uses: data.jsonl}."""
    sets: dict[str, Path] = {}
    for entry in card.get("datasets") or []:
        held_out = entry.get("held_out")
        if held_out and store.path(held_out).exists():
            what = (
                f"project {entry['project']}" if entry.get("project") is not None else "the replayed sample"
            )
            sets[f"held-out of {what} ({held_out[7:19]})"] = store.path(held_out)
    for name, digest in sorted(store.benchmarks().items()):
        sets[f"benchmark {name}"] = store.path(digest)
    return sets
