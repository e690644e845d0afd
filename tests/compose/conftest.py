"""The docker-compose deployment on a real Docker engine (tests/compose/compose_stack.py).

test_compose_stack.py, the fast subset, runs in `make test`: it is skipped where no Docker engine answers,
unless ROI_REQUIRE_DOCKER=1 (.ci/run sets it), which turns a missing engine into a failure.
test_compose_full.py is collected only under `make compose-test` (ROI_COMPOSE_FULL=1): `make test` never
sees it, rather than listing it as skipped.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.compose.compose_stack import ComposeStack, docker_engine_problem, ensure_base_images, env_file


def _engine_or_skip() -> None:
    problem = docker_engine_problem()
    if problem is None:
        return
    if os.environ.get("ROI_REQUIRE_DOCKER") == "1":
        pytest.fail(f"ROI_REQUIRE_DOCKER=1 but {problem}")
    pytest.skip(problem)


@pytest.fixture(scope="module")
def backend_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ComposeStack]:
    """A project of its own with redis and the backend built from this checkout; removed with its volumes."""
    _engine_or_skip()
    ensure_base_images("python", "redis")
    env = env_file(tmp_path_factory.mktemp("compose") / ".env", BACKEND_WORKERS="2")
    stack = ComposeStack(f"roi-label-test-{uuid.uuid4().hex[:8]}", env)
    try:
        yield stack
    finally:
        stack.down()


collect_ignore = [] if os.environ.get("ROI_COMPOSE_FULL") == "1" else ["test_compose_full.py"]


def require_engine() -> None:
    _engine_or_skip()


@pytest.fixture(scope="module")
def compose_workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("compose-full")
