"""Fixtures for the model unit tests."""

from __future__ import annotations

import pytest
from tiny_models import make_tiny


@pytest.fixture(scope="session")
def tiny():
    return make_tiny("convnext")
