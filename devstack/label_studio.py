"""A real Label Studio for the demo and the end-to-end tests.

Label Studio pins rq 2.6 and redis-py 5.2 (we use rq 3 and redis-py 8), so it lives in
its own virtual environment under `.cache/label-studio/`, made once by `ensure_venv`.
`LabelStudio` starts it headless on loopback with a pre-created user and a legacy API
token, with its calls to the outside world switched off, and the settings our ML backend
on 127.0.0.1 needs (see shared/reference/label-studio.md §1.2).
"""

from __future__ import annotations

import json
import logging
import secrets
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import requests
from filelock import FileLock

from devstack.processes import ManagedProcess, ProcessFailed
from devstack.redis_server import free_port

log = logging.getLogger(__name__)

LABEL_STUDIO_VERSION = "1.23.2"
DEFAULT_ROOT = Path(".cache/label-studio")
_CREDENTIALS_FILE = "credentials.json"
_LOG_FILE = "label-studio.log"


def ensure_venv(root: Path = DEFAULT_ROOT) -> Path:
    """The virtualenv with label-studio installed, made on first use (about a minute) and reused after.

    A stamp file written after a successful install marks the venv complete; a venv without
    it (an install that was interrupted) is made anew. A file lock keeps two test runs from
    installing into the same folder at once.
    """
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    venv = root / f"venv-{LABEL_STUDIO_VERSION}"
    stamp = venv / ".installed"
    with FileLock(root / ".install.lock"):
        if stamp.exists():
            return venv
        if venv.exists():
            log.warning("removing the incomplete Label Studio venv %s", venv)
            shutil.rmtree(venv)
        print(
            f"Installing label-studio=={LABEL_STUDIO_VERSION} into {venv} (once; about a minute)", flush=True
        )
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(venv / "bin" / "python"), "-m", "pip"]
        subprocess.run([*pip, "install", "-qq", f"label-studio=={LABEL_STUDIO_VERSION}"], check=True)
        stamp.write_text(LABEL_STUDIO_VERSION + "\n")
    return venv


def ensure_data_template(venv: Path) -> Path:
    """A data dir on which Label Studio has run once (migrated DB, admin user, token), made on first use.

    `copy_data_template` makes a fresh data dir from it that starts in seconds instead of the
    ~30-50 s of migrations; copies reuse the template's email, password and token.
    """
    venv = Path(venv).resolve()
    template = venv.parent / f"data-template-{LABEL_STUDIO_VERSION}"
    stamp = template / ".complete"
    with FileLock(venv.parent / ".template.lock"):
        if stamp.exists():
            return template
        if template.exists():
            shutil.rmtree(template)
        with LabelStudio(template, template / "files", venv=venv):
            pass
        stamp.write_text(LABEL_STUDIO_VERSION + "\n")
    return template


def copy_data_template(venv: Path, data_dir: Path) -> Path:
    """A new data dir at `data_dir` (which must not exist), copied from `ensure_data_template(venv)`."""
    template = ensure_data_template(venv)
    shutil.copytree(template, data_dir, ignore=shutil.ignore_patterns(_LOG_FILE, "files", ".complete"))
    return Path(data_dir)


def _label_studio_env(data_dir: Path, files_root: Path) -> dict[str, str]:
    """Settings for every `label-studio` command on this data dir (reference §1.2, §1.5, §2.6, §3)."""
    return {
        # Every CLI call needs the same data dir, or it silently migrates a new DB in ~/.local/share.
        "LABEL_STUDIO_BASE_DATA_DIR": str(data_dir),
        # Read only when the organization is first created; without it the legacy token gets 401,
        # and /setup hands our backend that legacy token.
        "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
        "LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK": "true",
        "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "true",
        "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(files_root),
        # A backend on 127.0.0.1: both are needed, the second for the backend's /webhook.
        "ML_BLOCK_LOCAL_IP": "false",
        "SSRF_PROTECTION_ENABLED": "false",
        # No calls to the outside world: version check, Sentry (on by default), analytics.
        "LATEST_VERSION_CHECK": "false",
        "SENTRY_DSN": "",
        "FRONTEND_SENTRY_DSN": "",
        "COLLECT_ANALYTICS": "false",
    }


class LabelStudio:
    """A Label Studio server on 127.0.0.1 with one admin user; a context manager.

    Start failures (the process died, or /health was not 200 before `start_timeout_s`) raise
    devstack.processes.ProcessFailed with the last lines of its output.

    The data dir holds the sqlite DB, the uploads, the log file (unless `output` is given)
    and the user's credentials, so a second start on the same data dir (about 5 s instead
    of about 35 s of migrations) logs in with the same email, password and token.
    """

    def __init__(
        self,
        data_dir: Path,
        files_root: Path,
        *,
        venv: Path | None = None,
        port: int | None = None,
        email: str = "admin@example.com",
        password: str | None = None,
        token: str | None = None,
        output: Callable[[str], None] | None = None,
        start_timeout_s: float = 240.0,
    ):
        self.data_dir = Path(data_dir).resolve()
        self.files_root = Path(files_root).resolve()
        self.venv = Path(venv).resolve() if venv is not None else None
        self.port = port
        self.start_timeout_s = start_timeout_s
        self._output = output
        self.email, self.password, self.token = self._credentials(email, password, token)
        self._process: ManagedProcess | None = None
        self._log_file = None
        self._serving = self._port_taken = False

    def _credentials(self, email: str, password: str | None, token: str | None) -> tuple[str, str, str]:
        # LS only creates the user (and sets its token) on the first start of a data dir: later
        # starts must use what that first start used.
        stored_path = self.data_dir / _CREDENTIALS_FILE
        if stored_path.exists():
            stored = json.loads(stored_path.read_text())
            wanted = {"email": email, "password": password, "token": token}
            clash = [key for key, value in wanted.items() if value is not None and value != stored[key]]
            if clash:
                raise ValueError(
                    f"{self.data_dir} already has a user with another {' and '.join(clash)} "
                    f"(use a fresh data dir, or leave them out to reuse the stored ones)"
                )
            return stored["email"], stored["password"], stored["token"]
        password = password or secrets.token_urlsafe(12)
        token = token or secrets.token_hex(20)
        if len(token) <= 5:
            raise ValueError("the Label Studio API token must be longer than 5 characters")
        if len(password) < 8:
            raise ValueError("the Label Studio password must have at least 8 characters")
        return email, password, token

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("Label Studio has not been started")
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.returncode is None

    @property
    def log_path(self) -> Path | None:
        """The log file, or None when the output goes to the `output` callback."""
        return None if self._output is not None else self.data_dir / _LOG_FILE

    def env(self) -> dict[str, str]:
        """The environment for any `label-studio` command on this data dir (start, user, …)."""
        return _label_studio_env(self.data_dir, self.files_root)

    def _command(self) -> list[str]:
        """`label-studio` through our launcher, in Label Studio's interpreter (label_studio_server.py: why)."""
        venv = self.venv or ensure_venv()
        return [str(venv / "bin" / "python"), str(Path(__file__).with_name("label_studio_server.py"))]

    def start(self) -> LabelStudio:
        if self._process is not None:
            raise RuntimeError("Label Studio is already running")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.files_root.mkdir(parents=True, exist_ok=True)
        # Stored before the first start: that start creates the user, even when it fails later.
        (self.data_dir / _CREDENTIALS_FILE).write_text(
            json.dumps({"email": self.email, "password": self.password, "token": self.token})
        )
        self.port = self.port or free_port()
        env = {
            **self.env(),
            "LABEL_STUDIO_USERNAME": self.email,
            "LABEL_STUDIO_PASSWORD": self.password,
            "LABEL_STUDIO_USER_TOKEN": self.token,
            # The "hostname" LS sends to ML backends in /setup; set so that no inherited HOST changes it.
            "LABEL_STUDIO_HOST": self.url,
        }
        argv = [
            *self._command(),
            "start",
            "--no-browser",
            "--internal-host",
            "127.0.0.1",
            "-p",
            str(self.port),
        ]
        if self._output is not None:
            sink = self._output
        else:
            self._log_file = open(self.data_dir / _LOG_FILE, "a", buffering=1)  # noqa: SIM115 (closed in stop)
            sink = self._write_log
        self._serving = self._port_taken = False

        def watch(line: str) -> None:
            # LS silently moves to the next port when ours is taken; a server answering /health there
            # may be someone else's, so "ready" needs LS's own line that it serves on our port.
            if line.startswith(f"Starting development server at {self.url}/"):
                self._serving = True
            elif line.startswith(f"* Port {self.port} is in use"):
                self._port_taken = True
            sink(line)

        self._process = ManagedProcess(
            "label-studio", argv, env=env, cwd=self.data_dir, sink=watch, prefix=""
        )
        try:
            self._process.start()
            self._process.wait_ready(self._ready, timeout_s=self.start_timeout_s)
        except BaseException:  # also Ctrl-C while waiting: __exit__ does not run when __enter__ fails
            self.stop()
            raise
        log.info("Label Studio is up at %s (data in %s)", self.url, self.data_dir)
        return self

    def _ready(self) -> bool:
        assert self._process is not None
        if self._port_taken:
            raise ProcessFailed("label-studio", f"port {self.port} is in use", self._process.tail())
        return self._serving and requests.get(f"{self.url}/health", timeout=2).status_code == 200

    def _write_log(self, line: str) -> None:
        assert self._log_file is not None
        self._log_file.write(line + "\n")

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after `grace_s`. Safe to call twice."""
        if self._process is not None:
            process, self._process = self._process, None
            process.stop(grace_s)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __enter__(self) -> LabelStudio:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
