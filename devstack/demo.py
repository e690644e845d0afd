"""`make demo`: the product on this machine, serving the shipped demo model, with a pre-labelled project.

    python -m devstack.demo [--model models/demo] [--state-dir .cache/demo]
                            [--ls-port 8080] [--backend-port 9090] [--exit-when-ready]

Starts Redis, a worker, the backend and Label Studio (devstack.stack), creates the project "Demo: region
captions" with 20 synthetic images, connects the backend as an interactive ML backend, pre-labels the
imported boxes, prints where to log in and what to try, and then stays in the foreground with every
process's log until Ctrl-C, which stops them all. Everything it makes lives in the state folder, so a
second run reuses the data (same project, same login) and starts in seconds. Label Studio and the backend
take 8080 and 9090 when those are free, other free ports otherwise.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock, Timeout

from backend.ls_client import LabelStudioError
from devstack.label_studio import (
    DEFAULT_ROOT,
    LABEL_STUDIO_VERSION,
    LabelStudio,
    copy_data_template,
    ensure_venv,
)
from devstack.processes import ProcessFailed
from devstack.provision import (
    ProvisionError,
    ensure_project,
    ensure_world,
    held_back,
    import_model,
    prelabel,
    world_tasks,
)
from devstack.stack import REPO_ROOT, LogLines, Stack, port_or_free
from worker.registry import RegistryError

DEFAULT_MODEL = REPO_ROOT / "models" / "demo"
DEFAULT_STATE = REPO_ROOT / ".cache" / "demo"
LABEL_STUDIO_ROOT = REPO_ROOT / DEFAULT_ROOT
PROJECT_TITLE = "Demo: region captions"
LABEL_CONFIG = REPO_ROOT / "labeling_configs" / "region_captioning.xml"
WORLD_NAME = "world"
IMAGES = 20
SEED = 7  # a world the demo model never saw (it trained on seed 1 and was evaluated on seed 2)
LABEL_STUDIO_PORT, BACKEND_PORT = 8080, 9090
EXIT_FAILED, EXIT_USAGE = 1, 2

_held_locks: list = []  # the state folder's lock file stays open (and locked) while the demo runs


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m devstack.demo", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", type=Path, default=DEFAULT_MODEL, help="model directory to serve (default: models/demo)"
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=DEFAULT_STATE,
        help="where the demo keeps Redis, Label Studio's data, the images and the model registry "
        "(default: .cache/demo)",
    )
    parser.add_argument("--ls-port", type=int, help="Label Studio's port (default: 8080 if free)")
    parser.add_argument("--backend-port", type=int, help="the backend's port (default: 9090 if free)")
    parser.add_argument(
        "--exit-when-ready", action="store_true", help="stop everything once the demo is ready (for timing)"
    )
    parser.add_argument(
        "--began-at",
        type=float,
        help="when `make demo` began (seconds since the epoch): the ready line then counts the install too",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not (args.model / "config.json").is_file():
        print(
            f"make demo: there is no model directory at {_shown(args.model)}: train the demo model with "
            "`make demo-model`, or pass --model DIR.",
            file=sys.stderr,
        )
        return EXIT_USAGE
    # Ctrl-C must reach us even when the shell started us with SIGINT ignored (a background job).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    lines = LogLines()
    try:
        return run(args, lines)
    except KeyboardInterrupt:
        lines("Stopped: every process the demo started has exited.")
        return 0
    except (ProvisionError, ProcessFailed, LabelStudioError, RegistryError) as error:
        print(f"make demo: {error}", file=sys.stderr)
        return EXIT_FAILED


def run(args: argparse.Namespace, lines: LogLines) -> int:
    started = time.monotonic()
    say = lines.prefixed("demo")
    state = args.state_dir.resolve()
    state.mkdir(parents=True, exist_ok=True)
    _hold_state_lock(state)
    files_root = state / "files"
    venv = ensure_venv(LABEL_STUDIO_ROOT)
    data_dir = _label_studio_data(venv, state, lines)
    version = import_model(state / "models", args.model)
    # The model's own world: values it never learned (purple, for the demo model) would only show as errors.
    world = ensure_world(files_root, WORLD_NAME, IMAGES, SEED, exclude=held_back(args.model))

    ls_port = args.ls_port or port_or_free(LABEL_STUDIO_PORT)
    backend_port = args.backend_port or port_or_free(BACKEND_PORT)
    label_studio = LabelStudio(
        data_dir, files_root, venv=venv, port=ls_port, output=_without_repeats(lines.prefixed("studio"))
    )
    with Stack(state, state / "models", label_studio, backend_port=backend_port, lines=lines) as stack:
        client = stack.client()
        setup = ensure_project(
            client,
            PROJECT_TITLE,
            LABEL_CONFIG.read_text(),
            world / "images",
            world_tasks(world),
            stack.backend_url,
        )
        prelabel(
            client,
            setup.project,
            version,
            progress=lambda done, total: say(f"pre-labelled {done} of {total} tasks"),
        )
        starting = time.monotonic() - started
        waited = time.time() - args.began_at if args.began_at else starting
        lines(_banner(stack, setup.project, version, len(setup.task_ids), waited, starting))
        if args.exit_when_ready:
            return 0
        stack.wait()
    return 0


def _hold_state_lock(state: Path) -> None:
    """Refuse to run twice on one state folder: two Label Studios on one database would corrupt it."""
    lock = FileLock(state / "demo.lock", timeout=0)  # held until we exit
    try:
        lock.acquire()
    except Timeout:
        raise ProvisionError(
            f"another demo is running on {_shown(state)}: stop it first (Ctrl-C in its terminal)"
        ) from None
    _held_locks.append(lock)


def _without_repeats(sink: Callable[[str], None]) -> Callable[[str], None]:
    """Label Studio 1.23 prints each request line twice in a row: show it once."""
    previous: list[str | None] = [None]

    def write(line: str) -> None:
        if line != previous[0]:
            sink(line)
        previous[0] = line

    return write


def _label_studio_data(venv: Path, state: Path, lines: LogLines) -> Path:
    """The demo's Label Studio data dir, copied from the migrated template on the first run."""
    data_dir = state / "label-studio"
    if data_dir.exists():
        return data_dir
    if not (venv.parent / f"data-template-{LABEL_STUDIO_VERSION}" / ".complete").exists():
        lines("Preparing Label Studio's database (once; about a minute)")
    # Copied aside and renamed into place: an interrupted copy never looks like a data dir.
    partial = state / ".label-studio.partial"
    shutil.rmtree(partial, ignore_errors=True)
    copy_data_template(venv, partial)
    partial.rename(data_dir)
    return data_dir


def _since(seconds: float, starting: float) -> str:
    """How the wait splits, when the ready line counts from `make demo` (installing, then starting)."""
    if seconds - starting < 1:
        return ""
    return f" since make demo began: {_minutes(seconds - starting)} installing, {_minutes(starting)} starting"


def _minutes(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest} s" if minutes else f"{rest} s"


def _banner(stack: Stack, project: int, version: str, tasks: int, seconds: float, starting: float) -> str:
    ls = stack.label_studio
    moved = []
    if ls.port != LABEL_STUDIO_PORT:
        moved.append(f"Label Studio on {ls.port}")
    if stack.backend_port != BACKEND_PORT:
        moved.append(f"the backend on {stack.backend_port}")
    ports = f"  ({LABEL_STUDIO_PORT}/{BACKEND_PORT} taken: {' and '.join(moved)})" if moved else ""
    rule = "-" * 100
    return "\n".join(
        [
            rule,
            f"The demo is ready ({seconds:.0f} s{_since(seconds, starting)}).{ports}",
            f"  Label Studio   {ls.url}/projects/{project}/data",
            f"  Log in as      {ls.email} / {ls.password}",
            f"  ML backend     {stack.backend_url}  (model {version}; {tasks} tasks pre-labelled)",
            "Try:",
            "  1. Open a task: each box already carries the model's caption (click a box, or see the region list).",
            '  2. Switch "Auto-Annotation" on (bottom of the labeling panel) and pick the smart rectangle tool.',
            "  3. Draw a box around a shape with it: the model's caption appears in that box's text field.",
            "Ctrl-C stops everything.",
            rule,
        ]
    )


def _shown(path: Path) -> str:
    resolved = path.resolve()
    return str(resolved.relative_to(REPO_ROOT)) if resolved.is_relative_to(REPO_ROOT) else str(path)


if __name__ == "__main__":
    sys.exit(main())
