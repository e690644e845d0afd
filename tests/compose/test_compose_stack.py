"""The fast subset of the deployment check, part of `make test`: Docker Compose v2 accepts the files, the
backend image builds from this checkout with no container registry, and redis + backend come up: redis healthy, the backend answering /health from its container with
503 "no live worker" (with no worker Label Studio must see the model as down, so the backend's container is
not healthy here; test_compose_full.py sees it healthy once a worker runs).
"""

from __future__ import annotations

import json
import time

from tests.compose.compose_stack import ComposeStack, image_size_mb
from tests.waiting import wait_until

HEALTH = """
import urllib.error, urllib.request
try:
    r = urllib.request.urlopen("http://127.0.0.1:9090/health", timeout=5)
except urllib.error.HTTPError as error:
    r = error
except OSError:
    raise SystemExit(1)
print(r.status, r.read().decode())
"""


def test_compose_accepts_the_files_gpu_and_cpu(backend_stack: ComposeStack) -> None:
    gpu = backend_stack.config()["services"]
    devices = {
        name: gpu[name]["deploy"]["resources"]["reservations"]["devices"] for name in ("worker", "trainer")
    }
    assert devices["worker"][0]["driver"] == "nvidia" and devices["worker"][0]["device_ids"] == ["0"]
    assert devices["trainer"][0]["device_ids"] == ["1"]
    cpu_stack = ComposeStack(
        backend_stack.project, backend_stack.env, ("docker-compose.yml", "docker-compose.cpu.yml")
    )
    cpu = cpu_stack.config()["services"]
    for name in ("worker", "trainer"):
        assert "deploy" not in cpu[name] or not cpu[name]["deploy"].get("resources"), cpu[name].get("deploy")
        assert cpu[name]["image"] == gpu[name]["image"]
    assert set(cpu) == set(gpu)


def test_backend_builds_and_comes_up_with_redis(backend_stack: ComposeStack) -> None:
    began = time.monotonic()
    backend_stack.run("build", "backend", timeout=1800)
    built_s = time.monotonic() - began
    up_s = backend_stack.up("redis")
    backend_stack.run("up", "--detach", "--no-build", "backend")

    def answer() -> str:
        return backend_stack.exec("backend", "python3", "-c", HEALTH, check=False).strip()

    status, _, body = wait_until(
        answer, timeout_s=120, message="the backend answers /health", poll_s=1
    ).partition(" ")
    up_s = time.monotonic() - began - built_s
    assert status == "503", body
    assert json.loads(body) == {"status": "DOWN", "reason": "no live worker: start a worker (roi-worker)"}
    assert backend_stack.ps()["backend"]["State"] == "running"
    # The backend image carries no torch (the web process never loads it).
    assert "no torch" in backend_stack.python(
        "backend", "import importlib.util as u; print('torch' if u.find_spec('torch') else 'no torch')"
    )
    # Redis runs as configured: AOF on, noeviction.
    # One key per call: `config get *` holds empty values, which a whitespace split would misalign.
    settings = {
        key: backend_stack.exec("redis", "redis-cli", "config", "get", key).splitlines()[-1].strip()
        for key in ("appendonly", "maxmemory-policy")
    }
    assert settings == {"appendonly": "yes", "maxmemory-policy": "noeviction"}
    print(f"\ncompose fast subset: backend build {built_s:.0f} s, up --wait {up_s:.0f} s, "
          f"image {image_size_mb('roi-label-backend'):.0f} MB")  # fmt: skip
