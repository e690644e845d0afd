"""backend.app with Flask's test client and no Redis: protocol shapes, auth, bad input, errors as JSON."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from backend.app import create_app
from backend.settings import Settings
from devstack.redis_server import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
CAPTION = (REPO_ROOT / "labeling_configs" / "region_captioning.xml").read_text()


def nobody_listening() -> Settings:
    """Settings whose Redis is a port nobody listens on: every Redis call fails at once."""
    return Settings(redis_url=f"redis://127.0.0.1:{free_port()}/0")


@pytest.fixture
def client():
    return create_app(nobody_listening()).test_client()


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def predict_body(**changes):
    return {
        "tasks": [{"id": 1, "data": {"image": "/data/upload/1/a.png"}}],
        "project": "1.1700000000",
        "label_config": CAPTION,
        "params": {"login": None, "password": None, "context": None},
        **changes,
    }


@pytest.mark.parametrize("path", ["/setup", "/predict", "/webhook"])
def test_malformed_json_is_a_400_naming_the_problem(client, path):
    reply = client.post(path, data=b'{"tasks": [', content_type="application/json")

    assert reply.status_code == 400
    assert reply.json["error"].startswith(
        "the request body is not valid JSON: Expecting value: line 1 column 12"
    )


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "the request body is empty; expected a JSON object"),
        (b"[1, 2]", "the request body must be a JSON object, got list"),
        (b"\xff\xfe", "the request body is not valid JSON"),
    ],
)
def test_a_body_that_is_no_json_object_is_a_400(client, data, message):
    reply = client.post("/predict", data=data)

    assert reply.status_code == 400
    assert reply.json["error"].startswith(message)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"tasks": []}, "'tasks' must be a non-empty list of Label Studio tasks"),
        ({"tasks": [{"data": {}}], "params": {"context": {"result": []}}}, "task 0 has no integer 'id'"),
        ({"label_config": ""}, "'label_config' must be the project's label config (XML)"),
        ({"project": "x.1"}, "project must be a project id or '<id>.<created_at>', got 'x.1'"),
        (
            {"params": {"context": {"result": "box"}}},
            "'params.context' must be a JSON object with a 'result' list",
        ),
        (
            {"tasks": [{"id": 1}, {"id": 2}], "params": {"context": {"result": []}}},
            "an interactive call (params.context set) needs exactly one task, got 2",
        ),
    ],
)
def test_predict_checks_its_body_before_touching_redis(client, changes, message):
    reply = client.post("/predict", json=predict_body(**changes))

    assert reply.status_code == 400
    assert reply.json == {"error": message}


def test_setup_rejects_an_unsupported_config_before_touching_redis(client):
    no_image = "<View><Text name='t' value='$text'/></View>"

    reply = client.post("/setup", json={"project": "1.1", "schema": no_image})

    assert reply.status_code == 400
    assert reply.json == {"error": "unsupported label config: no <Image> object in the label config"}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            {"prompt": "x"},
            "extra_params: prompt: unknown field (known: prompts, controls, train_every, train)",
        ),
        (
            {"train_every": -1},
            "extra_params: train_every: Input should be greater than or equal to 0 (got -1)",
        ),
        (
            {"prompts": {"caption": "Describe it."}},
            "extra_params: prompts.caption: the prompt must mention <region1>",
        ),
        ({"controls": {"answer": "nosuch"}}, "names tags the label config does not have: answer='nosuch'"),
    ],
)
def test_setup_rejects_bad_extra_params(client, extra, message):
    reply = client.post("/setup", json={"project": "1.1", "schema": CAPTION, "extra_params": extra})

    assert reply.status_code == 400
    assert message in reply.json["error"]


def test_webhook_without_an_action_is_a_400(client):
    reply = client.post("/webhook", json={"project": {"id": 1}})

    assert reply.status_code == 400
    assert reply.json == {"error": "webhook body needs a string 'action', got None"}


def test_an_ignored_webhook_does_not_need_redis(client):
    reply = client.post("/webhook", json={"action": "PROJECT_UPDATED", "project": {"id": 1}})

    assert reply.status_code == 200
    assert reply.json == {"status": "ignored", "action": "PROJECT_UPDATED"}


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("post", "/setup", {"project": "1.1", "schema": CAPTION}),
        ("post", "/predict", predict_body()),
        ("post", "/webhook", {"action": "START_TRAINING", "project": {"id": 1}}),
        ("get", "/versions", None),
    ],
)
def test_redis_down_is_a_503_at_once(client, method, path, body):
    started = time.monotonic()
    reply = getattr(client, method)(path, json=body)

    assert time.monotonic() - started < 1.0
    assert reply.status_code == 503
    assert reply.json["error"].startswith("Redis is unreachable: ")
    assert "connecting to 127.0.0.1" in reply.json["error"]


def test_health_with_redis_down_is_503_down(client):
    reply = client.get("/health")

    assert reply.status_code == 503
    assert reply.json["status"] == "DOWN"
    assert reply.json["reason"].startswith("Redis is unreachable")


def test_unknown_paths_and_methods_answer_json(client):
    assert client.get("/nosuch").status_code == 404
    assert "error" in client.get("/nosuch").json
    assert client.get("/predict").status_code == 405
    assert "error" in client.get("/predict").json


def test_an_unexpected_exception_is_a_500_without_traceback(caplog):
    app = create_app(nobody_listening())

    @app.get("/boom")
    def boom():
        raise KeyError("secret detail")

    reply = app.test_client().get("/boom")

    assert reply.status_code == 500
    assert reply.json == {"error": "internal error (KeyError); the backend log has the details"}
    assert "Traceback" not in reply.get_data(as_text=True)
    assert "Traceback" in caplog.text  # the log keeps it


@pytest.mark.parametrize("only", ["user", "pass"])
def test_basic_auth_is_off_unless_both_settings_are_set(only):
    settings = Settings(
        redis_url=nobody_listening().redis_url,
        basic_auth_user="ls" if only == "user" else "",
        basic_auth_pass="pw" if only == "pass" else "",
    )
    client = create_app(settings).test_client()

    assert client.post("/predict", data=b"{").status_code == 400  # reached the route


def test_basic_auth_when_both_are_set():
    settings = Settings(redis_url=nobody_listening().redis_url, basic_auth_user="ls", basic_auth_pass="pw")
    client = create_app(settings).test_client()

    missing = client.post("/predict", data=b"{")
    wrong = client.post("/predict", data=b"{", headers=basic("ls", "nope"))
    right = client.post("/predict", data=b"{", headers=basic("ls", "pw"))

    assert missing.status_code == wrong.status_code == 401
    assert missing.json["error"].startswith("basic auth required")
    assert missing.headers["WWW-Authenticate"] == 'Basic realm="roi-backend"'
    assert right.status_code == 400  # past auth, stopped by the malformed body
    assert client.get("/health").status_code == 401


def test_the_request_body_never_reaches_the_log(client, caplog):
    caplog.set_level("DEBUG")
    body = predict_body(params={"login": "ls-user", "password": "hunter2", "context": {"result": "bad"}})

    client.post("/predict", json=body, headers=basic("someone", "top-secret"))

    assert "hunter2" not in caplog.text
    assert (
        "top-secret" not in caplog.text
        and base64.b64encode(b"someone:top-secret").decode() not in caplog.text
    )


def test_the_web_process_does_not_import_torch():
    code = "import sys, backend.app; print(json.dumps(sorted(m for m in ('torch', 'roi_model', 'worker', 'transformers') if m in sys.modules)))"
    output = subprocess.run(
        [sys.executable, "-c", "import json; " + code],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout

    assert json.loads(output) == []
