"""TEST HARNESS: docker-compose.yml driven through `docker compose` itself, as an operator would.

A ComposeStack is one compose project (its own name, so its containers, network and volumes never touch a
user's `roi-label` stack) with an env file made from .env.example and fresh secrets. Every question about
the stack goes to Docker: `docker compose config`, `ps`, `exec`, the engine's health checks.
"""

from __future__ import annotations

import json
import re
import secrets
import shutil
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ENV_EXAMPLE = ROOT / ".env.example"
BASE_IMAGES = ROOT / "tests" / "compose" / "base_images.sh"


def docker_engine_problem() -> str | None:
    """Why no stack can be brought up here, or None when `docker compose` and its engine answer."""
    if shutil.which("docker") is None:
        return "no docker command"
    try:
        engine = subprocess.run(
            ["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True, timeout=20
        )
        plugin = subprocess.run(["docker", "compose", "version", "--short"], capture_output=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "docker does not answer"
    if engine.returncode != 0:
        return f"no Docker engine: {engine.stderr.decode().strip()}"
    if plugin.returncode != 0 or not plugin.stdout.decode().strip().startswith(("2.", "v2.")):
        return "no Docker Compose v2 CLI plugin"
    return None


def env_file(path: Path, **overrides: str) -> Path:
    """.env.example with its empty secrets filled in (fresh for each stack) and `overrides` set."""
    values = {
        "LABEL_STUDIO_USERNAME": "admin@example.com",
        "LABEL_STUDIO_PASSWORD": secrets.token_urlsafe(12),
        "LABEL_STUDIO_API_KEY": secrets.token_hex(20),
        **overrides,
    }
    lines = []
    for line in ENV_EXAMPLE.read_text().splitlines():
        match = re.fullmatch(r"#?\s*([A-Z][A-Z0-9_]*)=.*", line.strip())
        if match and match[1] in values:
            continue
        lines.append(line)
    lines += [f"{name}={value}" for name, value in values.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


class ComposeError(RuntimeError):
    pass


class ComposeStack:
    def __init__(self, project: str, env: Path, files: Sequence[str] = ("docker-compose.yml",)) -> None:
        self.project = project
        self.env = env
        self.files = list(files)
        self.values = dict(
            line.split("=", 1) for line in env.read_text().splitlines() if line and not line.startswith("#")
        )

    def command(self, *args: str) -> list[str]:
        files = [part for name in self.files for part in ("-f", str(ROOT / name))]
        return ["docker", "compose", "-p", self.project, "--project-directory", str(ROOT),
                "--env-file", str(self.env), *files, *args]  # fmt: skip

    def run(self, *args: str, timeout: float = 600, check: bool = True, input: str | None = None) -> str:
        done = subprocess.run(
            self.command(*args), capture_output=True, text=True, timeout=timeout, input=input
        )
        if check and done.returncode != 0:
            raise ComposeError(
                f"docker compose {' '.join(args)} exited {done.returncode}:\n{done.stdout}{done.stderr}"
            )
        return done.stdout

    def config(self) -> dict:
        return json.loads(self.run("config", "--format", "json"))

    def ps(self) -> dict[str, dict]:
        """service -> its container's state, as `docker compose ps` reports it."""
        out = self.run("ps", "--all", "--format", "json")
        rows = [json.loads(line) for line in out.splitlines() if line.strip()]
        if len(rows) == 1 and isinstance(rows[0], list):
            rows = rows[0]
        return {row["Service"]: row for row in rows}

    def health(self, service: str) -> str:
        return self.ps().get(service, {}).get("Health", "")

    def up(self, *services: str, timeout: float = 900) -> float:
        """Seconds until every named service is healthy (`up --wait`)."""
        began = time.monotonic()
        self.run("up", "--detach", "--wait", "--no-build", *services, timeout=timeout)
        return time.monotonic() - began

    def exec(self, service: str, *command: str, timeout: float = 120, check: bool = True) -> str:
        return self.run("exec", "-T", service, *command, timeout=timeout, check=check)

    def python(self, service: str, code: str, timeout: float = 120) -> str:
        return self.exec(service, "python3", "-c", code, timeout=timeout)

    def down(self) -> None:
        self.run("down", "--volumes", "--remove-orphans", "--timeout", "5", timeout=300, check=False)

    def logs(self, *services: str) -> str:
        return self.run("logs", "--no-color", *services, check=False)


def image_size_mb(image: str) -> float:
    out = subprocess.run(
        ["docker", "image", "inspect", "-f", "{{.Size}}", image], capture_output=True, text=True
    )
    return int(out.stdout.strip() or 0) / 1e6


def ensure_base_images(*names: str) -> None:
    """The official base images when they can be pulled or are present, else the harness's stand-ins."""
    subprocess.run([str(BASE_IMAGES)], env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin:/usr/local/bin",
                   "STANDINS": " ".join(names)}, check=True, timeout=3600)  # fmt: skip
