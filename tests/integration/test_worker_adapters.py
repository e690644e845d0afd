"""One real worker process (`python -m worker.main`) on a real redis-server serves two projects, each with its
LoRA adapter on the one base it loaded, and the base to a project that never trained (issue 22)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from backend.queues import INTERACTIVE, PRELABEL, enqueue, wait_for_result
from backend.registry_snapshot import read as registry_snapshot
from backend.settings import Settings
from tests.integration.worker_harness import describe_request, log_entries
from tests.unit.tiny_adapters import random_adapter

DESCRIBE = "worker.jobs.describe_regions"


def answers_with_adapter(
    model_dir: Path, adapter: Path | None, files_root: Path, request: dict
) -> list[dict]:
    """The request answered in this process by the base, with `adapter` active when given."""
    from backend.images import load_image
    from roi_contract.describe import DescribeRequest
    from roi_model.adapters import AdapterSet
    from roi_model.families import load_region_model
    from worker.jobs import describe_result, engine_request

    parsed = DescribeRequest.model_validate(request)
    image = load_image(parsed.image.url, task_id=None, settings=Settings(local_files_root=files_root))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers run (OMP_NUM_THREADS=1)
    try:
        engine = load_region_model(model_dir)
        if adapter is not None:
            adapters = AdapterSet(engine)
            adapters.load("expected", adapter)
            adapters.activate("expected")
        [answers] = engine.answer([engine_request(parsed, image)])
    finally:
        torch.set_num_threads(threads)
    return describe_result(parsed, answers, "unused").model_dump(mode="json")["answers"]


@pytest.fixture
def two_projects(model_registry, tmp_path):
    """Projects 11 and 12 with adapters of their own on base v1; project 13 never trained."""
    from roi_model.families import load_region_model

    language_model = load_region_model(model_registry.path("v1")).model.language_model
    for project, seed in ((11, 1), (12, 2)):
        adapter = random_adapter(language_model, tmp_path / f"adapter-{project}", seed)
        lineage = model_registry.lineage(project)
        lineage.promote(lineage.publish(adapter, extra={"base": "v1", "project": project}))
    return model_registry


def test_one_worker_serves_two_projects_with_their_adapters_and_the_base_to_the_others(
    redis_conn, start_worker, two_projects, worker_files
):
    registry = two_projects
    worker = start_worker("w1")
    plain = describe_request()

    results = {}
    for project in (11, 12, None, 13, 11, 12, 11):
        request = {**plain, **({"project": project} if project is not None else {})}
        queue = INTERACTIVE if project != 12 else PRELABEL  # both queues, one worker
        result = wait_for_result(enqueue(redis_conn, queue, DESCRIBE, request), timeout_s=60)
        previous = results.setdefault(project, result)
        assert result == previous  # the same answers every time a project asks

    versions = {project: result["model_version"] for project, result in results.items()}
    assert versions == {11: "v1+p11-v1", 12: "v1+p12-v1", None: "v1", 13: "v1"}
    base = answers_with_adapter(registry.path("v1"), None, worker_files, plain)
    for project in (11, 12):
        adapter = registry.lineage(project).path("v1")
        expected = answers_with_adapter(registry.path("v1"), adapter, worker_files, plain)
        got = results[project]["answers"]
        assert [a["text"] for a in got] == [a["text"] for a in expected]
        assert [a["score"] for a in got] == pytest.approx([a["score"] for a in expected], abs=1e-5)
        assert got[0]["score"] != pytest.approx(base[0]["score"], abs=1e-5)  # the adapter really answers
    assert results[11]["answers"] != results[12]["answers"]
    assert [a["score"] for a in results[13]["answers"]] == pytest.approx([a["score"] for a in base], abs=1e-5)

    # Each adapter was loaded once (7 jobs, 2 loads); the base once.
    loads = [entry for entry in log_entries(worker.recorded()) if "loaded adapter" in entry.get("msg", "")]
    assert len(loads) == 2, json.dumps(loads)
    assert worker.recorded().count("loaded model version") == 1
    assert registry_snapshot(redis_conn)["projects"] == {"11": "v1+p11-v1", "12": "v1+p12-v1"}

    # A rollback of project 11 reaches its next job; project 12 keeps its adapter.
    registry.lineage(11).rollback()
    again = {**plain, "project": 11}
    assert (
        wait_for_result(enqueue(redis_conn, INTERACTIVE, DESCRIBE, again), timeout_s=60)["model_version"]
        == "v1"
    )
    assert registry_snapshot(redis_conn)["projects"] == {"11": "v1", "12": "v1+p12-v1"}
