"""The whole deployment, as a user runs it (`make compose-test`): every image built from this checkout,
the stack up with the CPU worker variant (docker-compose.cpu.yml), the demo model imported with
`docker compose run`, and Label Studio driven through its API: a captioning project connected to the
backend by its service name, an interactive caption, a bulk pre-label written back, Start Training giving
a new version that the worker reloads. Then the faults: Redis restarted during a bulk pre-label, a worker
killed while it holds a chunk, the backend killed while a request waits.
"""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from backend.ls_client import JSON, LabelStudioClient
from devstack.provision import (
    ProjectSetup,
    drawn_rectangle,
    ensure_project,
    ensure_world,
    world_records,
    world_tasks,
)
from roi_model.synthetic import format_caption
from tests.compose.compose_stack import ROOT, ComposeStack, ensure_base_images, env_file, image_size_mb
from tests.compose.conftest import require_engine
from tests.waiting import wait_until

FILES = ("docker-compose.yml", "docker-compose.cpu.yml", "tests/compose/local-files.yml")
BACKEND_URL = "http://backend:9090"  # the backend's service name on the compose network
WORLD_IN_CONTAINER = "/label-studio/data/world"
CONFIG = (ROOT / "labeling_configs" / "region_captioning.xml").read_text()
TASKS = 24  # more than ROI_INLINE_PREDICT_TASKS: a bulk pre-label goes through the prelabel queue
FIGURES: dict[str, str] = {}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ComposeStack]:
    require_engine()
    began = time.monotonic()
    ensure_base_images("python", "redis", "label-studio")
    FIGURES["base images"] = f"{time.monotonic() - began:.0f} s"
    work = tmp_path_factory.mktemp("compose-full")
    port = free_port()
    # The training test follows the global lineage: a fine-tune makes a new base (/models/current).
    env = env_file(
        work / ".env",
        LABEL_STUDIO_PORT=str(port),
        LOG_LEVEL="INFO",
        BACKEND_WORKERS="2",
        ROI_FINETUNE_LINEAGE="global",
        ROI_PRELABEL_CHUNK_TASKS="4",  # 6 chunks of the 24 tasks: a worker holds one most of the time
    )
    stack = ComposeStack(f"roi-label-full-{port}", env, FILES)
    stack.port = port  # type: ignore[attr-defined]
    try:
        began = time.monotonic()
        stack.run("build", timeout=3600)
        FIGURES["build"] = f"{time.monotonic() - began:.0f} s"
        for image in ("roi-label-backend", "roi-label-worker"):
            FIGURES[image] = f"{image_size_mb(image):.0f} MB"
        began = time.monotonic()
        stack.up("redis", "label-studio", timeout=1200)
        FIGURES["label-studio healthy"] = f"{time.monotonic() - began:.0f} s"
        # The README's import, as a user runs it: the first version imported is served.
        out = stack.run("run", "--rm", "--no-deps", "-v", f"{ROOT / 'models' / 'demo'}:/import:ro", "worker",
                        "roi-model", "registry", "import", "/import", timeout=600)  # fmt: skip
        assert '"current"' in out, out
        began = time.monotonic()
        stack.up("backend", "worker", "trainer", timeout=1200)
        FIGURES["backend, worker, trainer healthy"] = f"{time.monotonic() - began:.0f} s"
        yield stack
    except BaseException:
        print(stack.logs())
        raise
    finally:
        print("\ncompose-test figures:", FIGURES)
        stack.down()


@pytest.fixture(scope="module")
def client(stack: ComposeStack) -> LabelStudioClient:
    return LabelStudioClient(f"http://127.0.0.1:{stack.port}", stack.values["LABEL_STUDIO_API_KEY"])  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def world(stack: ComposeStack, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("world-root")
    folder = ensure_world(root, "world", TASKS, seed=7)
    stack.run("cp", str(folder), f"label-studio:{WORLD_IN_CONTAINER}")
    return folder


def _project(client: LabelStudioClient, world: Path, title: str) -> ProjectSetup:
    return ensure_project(client, title, CONFIG, Path(WORLD_IN_CONTAINER), world_tasks(world), BACKEND_URL)


@pytest.fixture(scope="module")
def project(client: LabelStudioClient, world: Path) -> ProjectSetup:
    return _project(client, world, "captions")


def current_version(stack: ComposeStack) -> str:
    return stack.exec("worker", "cat", "/models/current").strip()


def predictions_of(client: LabelStudioClient, setup: ProjectSetup, version: str) -> dict[int, list[JSON]]:
    """task -> its predictions by model `version` (the world's tasks also carry their boxes as a prediction)."""
    return {
        task["id"]: [p for p in task.get("predictions") or [] if p.get("model_version") == version]
        for task in client.get_tasks(setup.project)
    }


def every_task_predicted(
    client: LabelStudioClient, setup: ProjectSetup, version: str
) -> dict[int, list[JSON]]:
    found = predictions_of(client, setup, version)
    return found if all(found.values()) else {}


def textareas(result: list[JSON]) -> list[JSON]:
    return [item for item in result if item.get("type") == "textarea"]


def test_backend_is_healthy_with_the_demo_model(stack: ComposeStack) -> None:
    states = stack.ps()
    assert {states[name]["Health"] for name in ("redis", "label-studio", "backend", "worker", "trainer")} == {
        "healthy"
    }, states


def test_an_interactive_caption_through_label_studio(
    client: LabelStudioClient, project: ProjectSetup, world: Path
) -> None:
    records = world_records(world)
    [task] = client.get_tasks(project.project, project.task_ids[:1])
    record = records[task["data"]["record_id"]]
    drawn = drawn_rectangle(record, 0, "drawn-1")
    reply = client.interactive_annotating(project.ml_backend, task["id"], [drawn])
    assert "errors" not in reply, reply
    [caption] = textareas(reply["data"]["result"])
    assert caption["value"]["text"] == [format_caption(**record["objects"][0])]


def test_a_bulk_prelabel_is_written_back(
    client: LabelStudioClient, project: ProjectSetup, stack: ComposeStack
) -> None:
    version = current_version(stack)
    client.retrieve_predictions(project.project)
    done = wait_until(
        lambda: every_task_predicted(client, project, version), 900, "every task predicted", poll_s=2
    )
    assert all(len(found) == 1 for found in done.values()), {task: len(found) for task, found in done.items()}
    assert all(textareas(found[0]["result"]) for found in done.values())


@pytest.mark.timeout(3600)  # a CPU fine-tune or a re-run chunk, on two shared cores
def test_start_training_gives_a_new_version_the_worker_reloads(
    client: LabelStudioClient, project: ProjectSetup, world: Path, stack: ComposeStack
) -> None:
    before = current_version(stack)
    records = world_records(world)
    tasks = {task["id"]: task for task in client.get_tasks(project.project)}
    for task_id, [prediction] in predictions_of(client, project, before).items():
        record = records[tasks[task_id]["data"]["record_id"]]
        result = []
        for item in json.loads(json.dumps(prediction["result"])):
            if item["type"] == "textarea":
                number = int(item["id"].rsplit("r", 1)[1])
                truth = format_caption(**record["objects"][number - 1])
                item["origin"] = "prediction" if item["value"]["text"] == [truth] else "prediction-changed"
                item["value"]["text"] = [truth]
            else:
                item["origin"] = "prediction"
            result.append(item)
        client.create_annotation(task_id, result, parent_prediction=prediction["id"])
    began = time.monotonic()
    client.start_training(project.ml_backend)
    after = wait_until(
        lambda: (v := current_version(stack)) != before and v, 1800, "a new current version", poll_s=5
    )
    FIGURES["training to a new version"] = f"{time.monotonic() - began:.0f} s"
    reloaded = (
        "import json, urllib.request; "
        "print(json.load(urllib.request.urlopen('http://127.0.0.1:9090/health'))['model_version'])"
    )
    wait_until(lambda: stack.exec("backend", "python3", "-c", reloaded, check=False).strip() == after, 600,
               "the worker serving the new version", poll_s=5)  # fmt: skip


# --- faults ----------------------------------------------------------------------------------------


@pytest.mark.timeout(3600)  # a CPU fine-tune or a re-run chunk, on two shared cores
def test_redis_restarted_during_a_bulk_prelabel_loses_no_job(
    client: LabelStudioClient, world: Path, stack: ComposeStack
) -> None:
    version = current_version(stack)
    setup = _project(client, world, "redis-restart")
    client.retrieve_predictions(setup.project)
    stack.run("restart", "redis", timeout=120)
    done = wait_until(
        lambda: every_task_predicted(client, setup, version), 900, "every task predicted", poll_s=2
    )
    assert all(len(found) == 1 for found in done.values()), {task: len(found) for task, found in done.items()}


# Run in the backend's container (it has rq and the settings): waits until a worker holds a chunk of a
# selection and prints that worker's host name (its container's id), name and the chunk's job id.
CHUNK_HOLDER = """
import sys, time
from rq import Worker
from backend.queues import connect
from backend.settings import Settings
connection = connect(Settings.from_env())
deadline = time.monotonic() + 600
while time.monotonic() < deadline:
    for worker in Worker.all(connection=connection):
        job = worker.get_current_job_id()
        if job and job.startswith("sel-"):
            print(worker.hostname, worker.name, job)
            sys.exit(0)
    time.sleep(0.05)
sys.exit("no worker took a chunk of the selection in 600 s")
"""

JOB_STATE = """
import sys
from rq.job import Job
from backend.queues import SERIALIZER, connect
from backend.settings import Settings
job = Job.fetch(sys.argv[1], connection=connect(Settings.from_env()), serializer=SERIALIZER)
print(job.get_status().value, job.worker_name)
"""


@pytest.mark.timeout(3600)  # a CPU fine-tune or a re-run chunk, on two shared cores
def test_a_worker_killed_while_it_holds_a_chunk_has_the_chunk_run_by_the_other(
    client: LabelStudioClient, world: Path, stack: ComposeStack
) -> None:
    stack.run("up", "--detach", "--no-build", "--no-recreate", "--scale", "worker=2", "worker", timeout=600)
    wait_until(lambda: sum(1 for line in stack.run("ps", "--format", "{{.Service}} {{.Health}}").splitlines()
                            if line == "worker healthy") == 2, 900, "two healthy workers", poll_s=5)  # fmt: skip
    version = current_version(stack)
    setup = _project(client, world, "worker-kill")
    holder = subprocess.Popen(
        stack.command("exec", "-T", "backend", "python3", "-c", CHUNK_HOLDER),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    client.retrieve_predictions(setup.project)
    out, err = holder.communicate(timeout=700)
    assert holder.returncode == 0, err
    container, killed_worker, chunk = out.split()
    subprocess.run(["docker", "kill", container], check=True, capture_output=True)
    print(f"killed worker {killed_worker} (container {container}) while it held {chunk}")

    try:
        done = wait_until(
            lambda: every_task_predicted(client, setup, version), 1200, "every task predicted", poll_s=2
        )
    except BaseException:  # what the next person debugging this needs: the chunk's state and the workers'
        print("chunk", chunk, stack.exec("backend", "python3", "-c", JOB_STATE, chunk, check=False))
        print(stack.logs("worker"))
        raise
    assert all(len(found) == 1 for found in done.values()), {task: len(found) for task, found in done.items()}
    status, finished_by = stack.exec("backend", "python3", "-c", JOB_STATE, chunk).split()
    assert (status, finished_by != killed_worker) == ("finished", True), (status, finished_by)


def test_the_backend_killed_while_a_request_waits_gives_an_error_then_service(
    client: LabelStudioClient, project: ProjectSetup, world: Path, stack: ComposeStack
) -> None:
    """The worker paused, so the interactive request is certainly waiting in the backend when the backend's
    container is killed (no graceful stop that lets it finish): Label Studio answers it with an error, and
    once the backend is up again the same drawing gets its caption."""
    records = world_records(world)
    [task] = client.get_tasks(project.project, project.task_ids[1:2])
    drawn = drawn_rectangle(records[task["data"]["record_id"]], 0, "drawn-2")
    # A paused worker blocked in BLPOP still receives the job id from Redis, so the queue stays empty:
    # the request waits in the backend once its job exists.
    jobs = ("exec", "-T", "redis", "redis-cli", "--scan", "--pattern", "rq:job:*")
    before = set(stack.run(*jobs).split())
    workers = stack.run("ps", "--quiet", "worker").split()  # the running ones (one was killed before)
    subprocess.run(["docker", "pause", *workers], check=True, capture_output=True)
    replies: list[JSON] = []
    waiting = threading.Thread(
        target=lambda: replies.append(client.interactive_annotating(project.ml_backend, task["id"], [drawn]))
    )
    try:
        waiting.start()
        wait_until(
            lambda: set(stack.run(*jobs).split()) - before or replies, 120, "the request's job enqueued"
        )
        assert not replies, f"Label Studio answered before the backend was killed: {replies}"
        stack.run("kill", "backend", timeout=120)
        waiting.join(300)
    finally:
        subprocess.run(["docker", "unpause", *workers], check=True, capture_output=True)
        stack.run("up", "--detach", "--no-build", "backend", timeout=300)
    assert replies, "Label Studio never answered"
    assert replies[0].get("errors"), replies[0]  # an error that says the backend failed, not a caption
    print("reply while the backend was killed:", replies[0])
    wait_until(lambda: stack.health("backend") == "healthy", 300, "the backend healthy again", poll_s=2)
    again = client.interactive_annotating(project.ml_backend, task["id"], [drawn])
    assert "errors" not in again, again
    assert textareas(again["data"]["result"]), again
