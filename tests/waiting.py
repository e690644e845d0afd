"""The one way tests wait: poll a condition until it holds, fail the test at a generous deadline."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import pytest

T = TypeVar("T")


def wait_until(
    condition: Callable[[], T], timeout_s: float = 20.0, message: str = "condition", poll_s: float = 0.02
) -> T:
    """Poll `condition` until it returns something truthy (returned); fail the test at the deadline."""
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        if time.monotonic() > deadline:
            pytest.fail(f"{message} not met within {timeout_s:g} s")
        time.sleep(poll_s)
    return value
