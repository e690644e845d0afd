"""/health, /setup and /versions against a real redis-server, and the two ways the backend is started:
gunicorn (production) and roi-backend (development), as real processes."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import requests

from backend import heartbeats, registry_snapshot
from backend.project_state import load_settings
from backend.settings import Settings
from devstack.redis_server import free_port
from roi_contract.project import ProjectSettings
from tests.integration.backend_harness import config, running_backend

CAPTION = config("region_captioning.xml")
VENV_BIN = Path(sys.executable).parent


@pytest.fixture
def backend(redis_server):
    with running_backend(Settings(redis_url=redis_server.url)) as running:
        yield running


def setup_body(**changes):
    return {
        "project": "5.1700000000",
        "schema": CAPTION,
        "hostname": "http://localhost:8080",
        "access_token": "legacy-token",
        "extra_params": None,
        **changes,
    }


def test_health_is_down_until_a_worker_beats(backend, redis_conn):
    down = backend.get("/health")
    assert down.status_code == 503
    assert down.json() == {"status": "DOWN", "reason": "no live worker: start a worker (roi-worker)"}

    heartbeats.beat(redis_conn, "gpu-0", {"model_version": "v2", "queues": ["interactive"]})
    up = backend.get("/health")

    assert up.status_code == 200
    assert up.json()["status"] == "UP"
    assert up.json()["model_version"] == "v2"
    assert [worker["name"] for worker in up.json()["workers"]] == ["gpu-0"]


def test_health_reports_redis_down_within_label_studios_one_second(backend, redis_server):
    redis_server.stop()

    started = time.monotonic()
    reply = backend.get("/health")

    assert time.monotonic() - started < 1.0
    assert reply.status_code == 503
    assert reply.json()["status"] == "DOWN"
    assert reply.json()["reason"].startswith("Redis is unreachable")


def test_setup_stores_the_extra_params_and_returns_the_served_version(backend, redis_conn):
    extra = {"prompts": {"caption": "Name <region1>."}, "controls": {"answer": "caption"}, "train_every": 3}

    no_model = backend.post("/setup", setup_body(extra_params=extra))
    assert no_model.status_code == 503
    assert no_model.json()["model_version"] is None
    stored = load_settings(redis_conn, 5)
    assert stored == ProjectSettings.from_extra_params(extra)
    assert (stored.prompts.caption, stored.controls.answer, stored.train_every) == (
        "Name <region1>.",
        "caption",
        3,
    )

    heartbeats.beat(redis_conn, "gpu-0", {"model_version": "v2", "queues": ["interactive"]})
    assert backend.post("/setup", setup_body()).json() == {"model_version": "v2"}

    registry_snapshot.publish(redis_conn, "v3", [{"version": "v2"}, {"version": "v3"}])
    assert backend.post("/setup", setup_body()).json() == {"model_version": "v3"}

    # A project with an adapter of its own is answered its version; the others the base.
    registry_snapshot.publish(redis_conn, "v3", [{"version": "v3"}], {"5": "v3+p5-v1"})
    assert backend.post("/setup", setup_body()).json() == {"model_version": "v3+p5-v1"}
    assert backend.post("/setup", setup_body(project="6.1700000000")).json() == {"model_version": "v3"}


def test_setup_rejects_a_config_it_cannot_serve(backend):
    no_rectangle = '<View><Image name="image" value="$image"/><TextArea name="t" toName="image"/></View>'

    reply = backend.post("/setup", setup_body(schema=no_rectangle))

    assert reply.status_code == 400
    assert reply.json() == {
        "error": "unsupported label config: no Rectangle/RectangleLabels control on image 'image'"
    }


def test_versions_lists_the_registry(backend, redis_conn):
    assert backend.get("/versions").json() == {"versions": [], "current": None, "cards": []}
    cards = [{"version": "v1", "metrics": {"cider": 0.4}}, {"version": "v2", "parent": "v1"}]
    registry_snapshot.publish(redis_conn, "v2", cards)

    assert backend.get("/versions").json() == {"versions": ["v1", "v2"], "current": "v2", "cards": cards}


def _poll_health(url: str, wait_until, auth=None) -> requests.Response:
    def answer() -> list[requests.Response]:
        # In a list: a Response with an error status is falsy.
        try:
            return [requests.get(url + "/health", auth=auth, timeout=2)]
        except (requests.ConnectionError, requests.Timeout):
            return []  # not listening yet, or its workers are still loading the app

    return wait_until(answer, timeout_s=30, message=f"{url} answers")[0]


def test_gunicorn_serves_the_app_factory_with_basic_auth(redis_server, redis_conn, start_process, wait_until):
    port = free_port()
    start_process(
        str(VENV_BIN / "gunicorn"), "--workers", "2", "--bind", f"127.0.0.1:{port}", "backend.app:create_app()",
        env={"REDIS_URL": redis_server.url, "BASIC_AUTH_USER": "ls", "BASIC_AUTH_PASS": "s3cret"},
        name="gunicorn",
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"

    assert _poll_health(url, wait_until).status_code == 401
    assert _poll_health(url, wait_until, auth=("ls", "wrong")).status_code == 401
    assert _poll_health(url, wait_until, auth=("ls", "s3cret")).json()["status"] == "DOWN"
    heartbeats.beat(redis_conn, "gpu-0", {"model_version": "v9", "queues": ["interactive"]})
    assert _poll_health(url, wait_until, auth=("ls", "s3cret")).json()["model_version"] == "v9"


def test_roi_backend_runs_the_development_server(redis_server, redis_conn, start_process, wait_until):
    port = free_port()
    start_process(
        str(VENV_BIN / "roi-backend"),
        "--port",
        str(port),
        env={"REDIS_URL": redis_server.url},
        name="roi-backend",
    )
    heartbeats.beat(redis_conn, "gpu-0", {"model_version": "v9", "queues": ["interactive"]})

    reply = _poll_health(f"http://127.0.0.1:{port}", wait_until)

    assert reply.status_code == 200
    assert reply.json()["model_version"] == "v9"
