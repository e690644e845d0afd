"""`roi-model train` on several devices: one process per device under torchrun, data-parallel.

The worker's train job calls `train_in_processes` when its worker owns more than one device
(ROI_TRAIN_DEVICES); roi_model.training does the rest (the global batch split over the processes, only the
first process writing the model). The first process's logged figures are passed to `options.on_log` as they
come, so the job's progress moves as it does in one process.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

from .training import TrainOptions


def train_command(options: TrainOptions) -> list[str]:
    """The `roi-model train` arguments that reproduce `options` (on_log aside)."""
    argv = ["-m", "roi_model.cli", "train", "--out", str(options.out)]
    for path in options.data:
        argv += ["--data", str(path)]
    argv += ["--init", str(options.init)] if options.init is not None else ["--config", str(options.config)]
    argv += ["--stage", options.stage, "--steps", str(options.steps), "--batch-size", str(options.batch_size)]
    argv += ["--lr", str(options.learning_rate), "--warmup-steps", str(options.warmup_steps)]
    argv += ["--save-every", str(options.save_every), "--seed", str(options.seed)]
    argv += ["--lora-rank", str(options.lora_rank)]
    if options.eval_data is not None:
        argv += ["--eval-data", str(options.eval_data), "--eval-every", str(options.eval_every)]
    if options.max_minutes is not None:
        argv += ["--max-minutes", str(options.max_minutes)]
    if options.device is not None:
        argv += ["--device", options.device]
    return argv


def train_in_processes(options: TrainOptions, processes: int) -> dict:
    """Run the training of `options` in `processes` processes; returns the run's summary (training.json)."""
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(processes),
    ]
    with subprocess.Popen(
        [*torchrun, *train_command(options)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
    ) as child:
        tail: list[str] = []
        for line in child.stdout:
            tail = [*tail[-40:], line.rstrip()]
            figures = _logged_figures(line)
            if figures is not None and options.on_log is not None:
                options.on_log(figures)
        code = child.wait()
    if code != 0:
        raise RuntimeError(f"training in {processes} processes failed (exit {code}):\n" + "\n".join(tail))
    return json.loads((Path(options.out) / "training.json").read_text())


def _logged_figures(line: str) -> dict | None:
    """The Trainer prints each logged step as a dict literal: {'loss': '1.2', 'learning_rate': ...}."""
    text = line.strip()
    if not (text.startswith("{") and text.endswith("}") and "loss" in text):
        return None
    try:
        figures = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return None
    if not isinstance(figures, dict):
        return None
    return {key: _number(value) for key, value in figures.items()}


def _number(value: object) -> object:
    """The Trainer prints its figures formatted ('1.234'): back to numbers where they are."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value
