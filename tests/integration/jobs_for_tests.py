"""Tiny job functions for the integration tests, run by real RQ workers in subprocesses.

Workers import this module by its dotted name, `tests.integration.jobs_for_tests`, with the repository root
on their import path. State that must survive between attempts of one job lives in files the test names.
"""

from __future__ import annotations

import time
from pathlib import Path

from rq import Retry


def echo(value, **extra):
    return {"echo": value, "extra": extra}


def fail(message: str):
    raise ValueError(message)


def fail_once(marker: str):
    """Raises on the first attempt (a transient failure), succeeds on the next."""
    if not Path(marker).exists():
        Path(marker).touch()
        raise ConnectionError("image server hung up (first attempt)")
    return "recovered"


def retry_then_wait(marker: str, go_file: str):
    """First attempt asks RQ to retry; the second waits for the test's go-ahead, then succeeds."""
    if not Path(marker).exists():
        Path(marker).touch()
        return Retry(max=2)
    wait_for_file(go_file)
    return "final answer"


def always_retry():
    return Retry(max=1)


def wait_for_file(path: str, limit_s: float = 30.0):
    """Runs until the test creates `path` (lets a test act while the job is in progress)."""
    deadline = time.monotonic() + limit_s
    while not Path(path).exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.02)
    return "go"


def own_timeout():
    """The timeout the worker runs this job under (what RQ's death penalty is set to)."""
    from rq import get_current_job

    return get_current_job().timeout
