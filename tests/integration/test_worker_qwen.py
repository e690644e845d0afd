"""A real worker process (`python -m worker.main`) on a real redis-server serving a tiny random Qwen2.5-VL
checkpoint: the family loader (roi_model.families) picks it from config.json; the answer per box equals the
family's own answer in this process (the text is random, the path is what is tested)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from backend.queues import INTERACTIVE, enqueue, wait_for_result
from backend.settings import Settings
from tests.integration.worker_harness import describe_request

DESCRIBE = "worker.jobs.describe_regions"


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.unit.tiny_qwen import tiny_qwen

    directory = tmp_path_factory.mktemp("tiny-qwen") / "model"
    tiny_qwen("qwen2_5_vl").save_pretrained(directory)
    return directory


@pytest.fixture
def model_registry(tmp_path: Path, qwen_dir: Path):  # replaces conftest's region-LLM registry
    from worker.registry import ModelRegistry

    registry = ModelRegistry(tmp_path / "models")
    registry.import_model(qwen_dir, version="qwen-v1")
    return registry


def test_the_worker_serves_a_qwen_vl_checkpoint(redis_conn, start_worker, model_registry, worker_files):
    from backend.images import load_image
    from roi_contract.describe import DescribeRequest
    from roi_model.families import load_region_model
    from worker.jobs import describe_result, engine_request

    start_worker("w1")
    request = describe_request()
    request["regions"].append({"id": "r2", "box": [0.5, 0.5, 1.0, 1.0]})
    request["questions"].append(
        {"id": "r2:caption", "text": "Describe <region1> briefly.", "regions": ["r2"]}
    )

    result = wait_for_result(enqueue(redis_conn, INTERACTIVE, DESCRIBE, request), timeout_s=120)

    parsed = DescribeRequest.model_validate(request)
    image = load_image(parsed.image.url, task_id=None, settings=Settings(local_files_root=worker_files))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers run (OMP_NUM_THREADS=1)
    try:
        [answers] = load_region_model(model_registry.path("qwen-v1"), device="cpu").answer(
            [engine_request(parsed, image)]
        )
    finally:
        torch.set_num_threads(threads)
    expected = describe_result(parsed, answers, "unused").model_dump(mode="json")["answers"]
    assert result["model_version"] == "qwen-v1"
    assert [a["id"] for a in result["answers"]] == ["r1:caption", "r2:caption"]
    assert [a["text"] for a in result["answers"]] == [a["text"] for a in expected]
    assert [a["score"] for a in result["answers"]] == pytest.approx([a["score"] for a in expected], abs=1e-4)
