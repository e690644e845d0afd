"""`roi-model train` over two CPU processes (torchrun, gloo; roi_model/launch.py, what a train job runs with
ROI_TRAIN_DEVICES=2) against one process: the same steps over the same records give the same loss curve,
the progress arrives from the first process, and only it writes the model."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from devstack.processes import ManagedProcess
from roi_model.launch import train_command, train_in_processes
from roi_model.synthetic import generate_world
from roi_model.training import TrainOptions
from tests.integration.conftest import REPO_ROOT

STEPS = 6


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world")
    generate_world(out, 16, seed=11)
    return out


def options(world: Path, out: Path, **extra) -> TrainOptions:
    return TrainOptions(
        data=[world / "data.jsonl"],
        out=out,
        config="tiny-convnext",
        stage="scratch",
        steps=STEPS,
        batch_size=4,
        warmup_steps=1,
        seed=3,
        device="cpu",
        **extra,
    )


def test_two_processes_follow_the_loss_curve_of_one_and_save_one_model(world, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    single, double = tmp_path / "single", tmp_path / "double"
    child = ManagedProcess(
        "single",
        [sys.executable, *train_command(options(world, single))],
        cwd=REPO_ROOT,
        sink=lambda line: None,
        record=tmp_path / "single.log",
    ).start()
    assert child.wait(timeout_s=900) == 0, child.recorded()[-4000:]
    reported: list[dict] = []

    two = train_in_processes(options(world, double, on_log=reported.append), processes=2)

    one = json.loads((single / "training.json").read_text())
    assert (one["processes"], two["processes"]) == (1, 2)
    assert [p["step"] for p in one["loss_curve"]] == [p["step"] for p in two["loss_curve"]]
    assert len(two["loss_curve"]) == STEPS
    for a, b in zip(one["loss_curve"], two["loss_curve"], strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=0.02), (one["loss_curve"], two["loss_curve"])
    shown = [r["loss"] for r in reported if "loss" in r]  # the Trainer prints them to 4 digits
    assert shown == pytest.approx([p["loss"] for p in two["loss_curve"]], rel=1e-3)
    saved = sorted(path.name for path in double.iterdir())
    assert saved == sorted(path.name for path in single.iterdir())
    assert saved.count("model.safetensors") == 1 and "checkpoints" not in saved
