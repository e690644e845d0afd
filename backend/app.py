"""The ML-backend HTTP service Label Studio talks to (protocol: reference/label-studio.md §2).

`create_app()` is the Flask application factory; production runs it under gunicorn
(``gunicorn 'backend.app:create_app()'``), development through `main()` (the ``roi-backend`` script).

Routes: GET /health, POST /setup, POST /predict, POST /webhook, GET /versions, GET /training/<project>,
GET and DELETE /prelabel/<project>. Every reply is JSON, errors included: 400 names the problem with the
request, 401 asks for basic auth, 404 names what does not exist, 503 says what is unreachable, and anything
unexpected is logged and answered with a 500 that carries no traceback.

Two Redis clients: `fast` (short socket timeouts, no retries) for the calls Label Studio gives 1-3 s (health,
setup, versions, webhook) and for reading project state, so a Redis outage is reported at once; and the
queue client of backend.queues for enqueueing describe jobs and waiting on them, which rides out a short
Redis restart. The process never imports torch, roi_model or worker: jobs are enqueued by dotted name.
"""

from __future__ import annotations

import argparse
import hmac
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis
from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import BadRequest, HTTPException, NotFound

from backend import heartbeats, project_state, registry_snapshot, selections, webhooks
from backend.labeling import UnsupportedConfig, scheme_from_config
from backend.ls_client import LabelStudioClient
from backend.predict import DESCRIBE_JOB, PRELABEL_FAILED, PRELABEL_JOB, Predictor, parse_predict_request
from backend.queues import connect, redis_url
from backend.settings import Settings, SettingsError
from backend.training_status import training_status
from roi_contract.project import ProjectSettings

log = logging.getLogger(__name__)

# Label Studio calls /health with a 1 s timeout and /webhook with 1 s: Redis gets a fraction of that.
FAST_CONNECT_TIMEOUT_S = 0.25
FAST_SOCKET_TIMEOUT_S = 0.5

DEFAULT_PORT = 9090  # the port Label Studio's ML backends use by convention


@dataclass(frozen=True)
class JobNames:
    """The worker's job functions, by dotted name (tests point them at their own job module)."""

    describe: str = DESCRIBE_JOB
    prelabel: str = PRELABEL_JOB
    prelabel_failed: str | None = PRELABEL_FAILED
    finetune: str = webhooks.FINETUNE_JOB


def create_app(settings: Settings | None = None, *, job_names: JobNames | None = None) -> Flask:
    settings = settings or Settings.from_env()
    job_names = job_names or JobNames()
    _configure_logging(settings.log_level)

    fast = redis.Redis.from_url(
        redis_url(settings),
        socket_connect_timeout=FAST_CONNECT_TIMEOUT_S,
        socket_timeout=FAST_SOCKET_TIMEOUT_S,
        retry=None,
    )
    predictor = Predictor(
        connect(settings),
        timeout_s=settings.predict_timeout_s,
        inline_tasks=settings.inline_predict_tasks,
        chunk_tasks=settings.prelabel_chunk_tasks,
        max_new_tokens=settings.max_new_tokens,
        describe_job=job_names.describe,
        prelabel_job=job_names.prelabel,
        prelabel_failed=job_names.prelabel_failed,
    )

    # Label Studio's API, for checks before a job is queued (Start Training); without a key they are skipped.
    label_studio = (
        LabelStudioClient(settings.label_studio_url, settings.label_studio_api_key, timeout_s=30.0)
        if settings.label_studio_api_key
        else None
    )

    app = Flask("backend")
    # Werkzeug answers 413 before reading a larger body; our error handler makes it JSON.
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes
    _register_auth(app, settings)
    _register_error_handlers(app)

    @app.get("/health")
    def health() -> tuple[Response, int]:
        try:
            workers = heartbeats.live_workers(fast)
            version = served_version(fast, workers)
        except redis.RedisError as exc:
            return jsonify(status="DOWN", reason=redis_problem(exc)), 503
        if not workers:
            return jsonify(status="DOWN", reason="no live worker: start a worker (roi-worker)"), 503
        return jsonify(status="UP", model_version=version, workers=workers), 200

    @app.post("/setup")
    def setup() -> tuple[Response, int]:
        body = _json_object()
        try:
            project_id = project_state.parse_project_id(body.get("project"))
            settings_of_project = ProjectSettings.from_extra_params(body.get("extra_params"))
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        scheme_from_config(body.get("schema"), settings_of_project.controls)  # UnsupportedConfig -> 400
        project_state.save_setup(fast, project_id, settings_of_project, body.get("hostname"))
        version = served_version(fast, heartbeats.live_workers(fast), project_id)
        if version is None:
            # Label Studio marks a backend Connected on any 2xx; without a model there is nothing to serve.
            return jsonify(
                error="no model version is served yet: no worker has published its registry or a heartbeat",
                model_version=None,
            ), 503
        return jsonify(model_version=version), 200

    @app.post("/predict")
    def predict() -> dict[str, Any]:
        call = parse_predict_request(_json_object())
        params = project_state.load_settings(fast, call.project_id)
        scheme = scheme_from_config(call.label_config, params.controls)
        return predictor.predict(call, scheme, params)

    @app.post("/webhook")
    def webhook() -> Any:
        body = _json_object()
        try:
            event = webhooks.parse_event(body)
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        if event is None:
            return {"status": "ignored", "action": body["action"]}
        try:
            return webhooks.handle_event(
                fast,
                event,
                default_train_every=settings.train_every_annotations,
                finetune_job=job_names.finetune,
                label_studio=label_studio,
            )
        except webhooks.TrainingRefused as refusal:
            log.warning("project %s: Start Training refused: %s", event.project_id, refusal)
            return jsonify(error=str(refusal)), 422

    @app.get("/training/<int:project_id>")
    def training(project_id: int) -> dict[str, Any]:
        """The project's fine-tune: status, progress, and the gate's decision (README: "Start Training")."""
        return training_status(fast, project_id)

    @app.get("/prelabel/<int:project_id>")
    def prelabel_progress(project_id: int) -> dict[str, Any]:
        """The project's latest bulk pre-label: done / failed / total, failures by reason, its state."""
        return _on_latest_selection(fast, project_id, selections.selection_status)

    @app.delete("/prelabel/<int:project_id>")
    def cancel_prelabel(project_id: int) -> dict[str, Any]:
        """Cancel the project's latest bulk pre-label: queued chunks never run, a running chunk finishes."""
        status = _on_latest_selection(fast, project_id, selections.cancel_selection)
        log.warning("project %s: bulk pre-label %s cancelled", project_id, status["selection"])
        return status

    @app.get("/versions")
    def versions() -> dict[str, Any]:
        snapshot = registry_snapshot.read(fast)
        cards = snapshot.get("versions") or []
        return {
            "versions": [card.get("version") for card in cards if isinstance(card, dict)],
            "current": snapshot.get("current"),
            "cards": cards,
        }

    return app


def _on_latest_selection(
    connection: redis.Redis, project_id: int, action: Callable[[redis.Redis, str], dict[str, Any]]
) -> dict[str, Any]:
    selection = selections.latest_selection(connection, project_id)
    try:
        if selection is not None:
            return action(connection, selection)
    except KeyError:  # its record expired
        pass
    raise NotFound(
        f"project {project_id} has no bulk pre-label in the last {selections.KEPT_S // 86400} days"
    )


def served_version(connection: redis.Redis, workers: list[dict], project: int | None = None) -> str | None:
    """The version the registry serves to `project` (its adapter's, else the base), else the version a live
    worker reports, else None."""
    current = registry_snapshot.project_version(registry_snapshot.read(connection), project)
    if current:
        return current
    return next((w["model_version"] for w in workers if w.get("model_version")), None)


def redis_problem(error: redis.RedisError) -> str:
    """What a Redis error means for whoever waits on the backend, in one line."""
    if isinstance(error, redis.exceptions.OutOfMemoryError):
        return f"Redis is full (maxmemory reached), try again once it has room: {error}"
    if isinstance(error, redis.BusyLoadingError):
        return f"Redis is loading its data after a restart, try again shortly: {error}"
    if isinstance(error, redis.ReadOnlyError):
        return f"Redis is a read-only replica (a failover in progress?): {error}"
    if isinstance(error, redis.ConnectionError | redis.TimeoutError):
        return f"Redis is unreachable: {error}"
    return f"Redis refused the request: {type(error).__name__}: {error}"


def _json_object() -> dict[str, Any]:
    raw = request.get_data()
    if not raw.strip():
        raise BadRequest("the request body is empty; expected a JSON object")
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:  # also numbers longer than Python reads (4300 digits)
        raise BadRequest(f"the request body is not valid JSON: {str(exc)[:200]}") from None
    except RecursionError:
        raise BadRequest("the request body nests JSON deeper than the backend reads") from None
    if not isinstance(body, dict):
        raise BadRequest(f"the request body must be a JSON object, got {type(body).__name__}")
    return body


def _register_auth(app: Flask, settings: Settings) -> None:
    """Basic auth on every route, only when both BASIC_AUTH_USER and BASIC_AUTH_PASS are set."""
    if not (settings.basic_auth_user and settings.basic_auth_pass):
        return
    expected_user = settings.basic_auth_user.encode()
    expected_pass = settings.basic_auth_pass.encode()

    @app.before_request
    def require_basic_auth() -> tuple[Response, int, dict[str, str]] | None:
        given = request.authorization
        if given is not None and given.type == "basic":
            user_ok = hmac.compare_digest((given.username or "").encode(), expected_user)
            pass_ok = hmac.compare_digest((given.password or "").encode(), expected_pass)
            if user_ok and pass_ok:
                return None
        return (
            jsonify(
                error="basic auth required: register the backend in Label Studio with its user and password"
            ),
            401,
            {"WWW-Authenticate": 'Basic realm="roi-backend"'},
        )


def _register_error_handlers(app: Flask) -> None:
    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> tuple[Response, int]:
        if exc.code == 400:
            log.warning("%s %s: 400: %s", request.method, request.path, exc.description)
        return jsonify(error=exc.description), exc.code or 500

    @app.errorhandler(UnsupportedConfig)
    def unsupported_config(exc: UnsupportedConfig) -> tuple[Response, int]:
        log.warning("%s %s: unsupported label config: %s", request.method, request.path, exc)
        return jsonify(error=f"unsupported label config: {exc}"), 400

    @app.errorhandler(redis.RedisError)
    def redis_unavailable(exc: redis.RedisError) -> tuple[Response, int]:
        reason = redis_problem(exc)
        log.error("%s %s: %s", request.method, request.path, reason)
        return jsonify(error=reason), 503

    @app.errorhandler(Exception)
    def unexpected(exc: Exception) -> tuple[Response, int]:
        log.exception("%s %s failed", request.method, request.path)
        return jsonify(error=f"internal error ({type(exc).__name__}); the backend log has the details"), 500


def _configure_logging(level: str) -> None:
    # Under gunicorn nobody else configures logging; basicConfig does nothing when handlers exist.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("backend").setLevel(level)


def main(argv: list[str] | None = None) -> None:
    """roi-backend: the development server (production: gunicorn 'backend.app:create_app()')."""
    parser = argparse.ArgumentParser(prog="roi-backend", description=main.__doc__)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="port (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        app = create_app()
    except SettingsError as error:
        parser.exit(2, f"roi-backend: {error}\n")
    app.run(host=args.host, port=args.port, threaded=True)


if __name__ == "__main__":
    main()
