"""The backend app served over real HTTP on loopback, for the backend's integration tests.

`running_backend` serves `create_app(settings)` with werkzeug's threaded server in a background thread
(the same WSGI app gunicorn runs), with the jobs pointed at tests/integration/fake_worker_jobs.py.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import redis
import requests
from werkzeug.serving import make_server

from backend.app import JobNames, create_app
from backend.settings import Settings
from tests.integration import fake_worker_jobs

FAKE = "tests.integration.fake_worker_jobs"
FAKE_JOBS = JobNames(
    describe=f"{FAKE}.describe_regions",
    prelabel=f"{FAKE}.prelabel_chunk",
    prelabel_failed=None,
    finetune=f"{FAKE}.finetune",
)
CONFIGS = Path(__file__).resolve().parents[2] / "labeling_configs"


class RunningBackend:
    def __init__(self, url: str) -> None:
        self.url = url
        self.session = requests.Session()

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        return self.session.get(self.url + path, timeout=30, **kwargs)

    def post(self, path: str, body: Any = None, **kwargs: Any) -> requests.Response:
        return self.session.post(self.url + path, json=body, timeout=30, **kwargs)


@contextmanager
def running_backend(settings: Settings, job_names: JobNames = FAKE_JOBS) -> Iterator[RunningBackend]:
    app = create_app(settings, job_names=job_names)
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, name="backend", daemon=True)
    thread.start()
    backend = RunningBackend(f"http://127.0.0.1:{server.server_port}")
    try:
        yield backend
    finally:
        backend.session.close()
        server.shutdown()
        thread.join(timeout=10)


def config(name: str) -> str:
    return (CONFIGS / name).read_text()


def fake_calls(connection: redis.Redis, job: str | None = None) -> list[dict]:
    """The calls the fake jobs logged, oldest first; only those of `job` when given."""
    calls = [json.loads(entry) for entry in connection.lrange(fake_worker_jobs.CALLS, 0, -1)]
    return [call for call in calls if job is None or call["job"] == job]


def rectangle(region_id: str, x: float, y: float, width: float, height: float, **extra: Any) -> dict:
    """A rectanglelabels item as Label Studio sends it (reference/label-studio.md §2.4)."""
    return {
        "id": region_id,
        "from_name": "label",
        "to_name": "image",
        "type": "rectanglelabels",
        "original_width": 800,
        "original_height": 600,
        "image_rotation": 0,
        "value": {
            "x": x,
            "y": y,
            "width": width,
            "height": height,
            "rotation": 0,
            "rectanglelabels": ["Object"],
        },
        **extra,
    }


def predict_body(
    label_config: str, tasks: list[dict], context: dict | None = None, project: str = "3.1700000000"
):
    return {
        "tasks": tasks,
        "project": project,
        "label_config": label_config,
        "params": {"login": None, "password": None, "context": context},
    }
