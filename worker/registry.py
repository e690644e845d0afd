"""The model registry: immutable model versions on disk and one pointer to the version being served.

Layout under the root ($MODEL_DIR, DESIGN.md):

    versions/<version>/    a Hugging Face model directory plus card.json (version, parent, dataset digest,
                           metrics, created_at, and whatever extra fields the publisher passed)
    current                the served version's name; replaced atomically (os.replace), so a reader sees
                           the old name or the new one, never a partial file
    history.jsonl          one line per promotion or rollback, appended under the lock
    trainings.jsonl        one line per fine-tuning run, promoted or not (worker/finetune.py writes them)
    .lock                  the file lock (filelock) held by everything that changes the registry

A version is copied into a hidden directory inside versions/ and renamed into place when complete, so a
crash mid-copy never leaves a half-written version that looks real (the hidden leftover is ignored; delete
it by hand). Rollback steps back through the promotions: promote v1, v2, v3 then rollback twice serves v1.

Projects (issue 22): each Label Studio project has a lineage of its own, of LoRA adapters on the shared base:

    projects/<project>/adapters/<version>/   a peft adapter directory (adapter_config.json,
                                             adapter_model.safetensors) plus card.json, whose "base" names
                                             the base version it was trained on
    projects/<project>/current               the adapter served to the project (absent: the base alone)
    projects/<project>/history.jsonl         its promotions and rollbacks

`ModelRegistry(root, project=P)` (or `registry.lineage(P)`) is the same API on project P's lineage; the
global lineage (`project=None`) is the base's. A project is served its current adapter on the current base;
a project that never trained, whose adapters were all rolled back, or whose adapter was trained on another
base than the one served now, is served the base. The version a prediction carries names both:
"<base>+p<project>-<adapter>" (`Serving.version`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from filelock import FileLock

from backend.atomic_files import write_bytes_atomically

log = logging.getLogger(__name__)

CARD_FILE = "card.json"
VERSION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
AUTO_VERSION = re.compile(r"v(\d+)")
CARD_KEYS = ("version", "parent", "dataset_digest", "metrics", "created_at")


class RegistryError(Exception):
    """A registry operation cannot be done; the message says why."""


class UnknownVersion(RegistryError, LookupError):
    """No such model version in the registry."""


@dataclass(frozen=True)
class Serving:
    """What a project is served: the base version, and the project's adapter on it (None: the base alone)."""

    base: str
    project: int | None = None
    adapter: str | None = None

    @property
    def version(self) -> str:
        """The model version its predictions carry (Label Studio filters by it)."""
        return (
            self.base if self.adapter is None else adapter_version_name(self.base, self.project, self.adapter)
        )


def adapter_version_name(base: str, project: int | None, adapter: str) -> str:
    return f"{base}+p{project}-{adapter}"


class ModelRegistry:
    def __init__(self, root: Path | str, project: int | None = None) -> None:
        self.root = Path(root)
        self.project = _checked_project(project)
        if project is None:
            self.lineage_dir = self.root
            self.versions_dir = self.root / "versions"
        else:
            self.lineage_dir = self.root / "projects" / str(project)
            self.versions_dir = self.lineage_dir / "adapters"
        self.current_file = self.lineage_dir / "current"
        self.history_file = self.lineage_dir / "history.jsonl"
        self.trainings_file = self.root / "trainings.jsonl"
        self.lock_file = self.root / ".lock"

    def lineage(self, project: int | None) -> ModelRegistry:
        """The registry of project `project`'s adapters (None: the global lineage of bases)."""
        return ModelRegistry(self.root, project)

    def base(self) -> ModelRegistry:
        return self.lineage(None)

    def projects(self) -> list[int]:
        """The projects that have a lineage (at least one adapter published), in numeric order."""
        folder = self.root / "projects"
        if not folder.is_dir():
            return []
        return sorted(
            int(entry.name) for entry in folder.iterdir() if entry.name.isdigit() and entry.is_dir()
        )

    def serving(self, project: int | None) -> Serving | None:
        """What `project` is served now (None: nothing, no base is promoted yet)."""
        base = self.base().current()
        if base is None:
            return None
        if project is None:
            return Serving(base)
        lineage = self.lineage(project)
        adapter = lineage.current()
        if adapter is None:
            return Serving(base, project)
        try:
            trained_on = lineage.card(adapter).get("base")
        except RegistryError as error:
            log.warning("project %s: adapter %s unreadable (%s); serving the base", project, adapter, error)
            return Serving(base, project)
        if trained_on != base:
            log.info(
                "project %s: adapter %s was trained on base %s, the base is now %s; serving the base",
                project,
                adapter,
                trained_on,
                base,
            )
            return Serving(base, project)
        return Serving(base, project, adapter)

    def served_versions(self) -> dict[str, str]:
        """Per project with a lineage, the version its predictions carry: {"3": "demo-1+p3-v2"}."""
        versions = {}
        for project in self.projects():
            serving = self.serving(project)
            if serving is not None:
                versions[str(project)] = serving.version
        return versions

    # --- reading -------------------------------------------------------------------------------------

    def versions(self) -> list[dict[str, Any]]:
        """The cards of all published versions, oldest first."""
        if not self.versions_dir.is_dir():
            return []
        cards = []
        for entry in self.versions_dir.iterdir():
            if entry.name.startswith(".") or not entry.is_dir():
                continue  # a copy in progress, or the leftover of a crashed one
            try:
                cards.append(self.card(entry.name))
            except RegistryError as error:
                log.warning("skipping %s: %s", entry, error)
        return sorted(cards, key=lambda card: (card.get("created_at", ""), card["version"]))

    def current(self) -> str | None:
        """The served version's name, None when nothing was promoted yet."""
        try:
            return self.current_file.read_text().strip() or None
        except FileNotFoundError:
            return None

    def path(self, version: str) -> Path:
        """The model directory of `version` (raises UnknownVersion when it does not exist)."""
        directory = self.versions_dir / _checked_name(version)
        if not (directory / CARD_FILE).is_file():
            known = ", ".join(card["version"] for card in self.versions()) or "none"
            raise UnknownVersion(
                f"model version {version!r} not found in {self.versions_dir} (known: {known})"
            )
        return directory

    def card(self, version: str) -> dict[str, Any]:
        card_path = self.versions_dir / _checked_name(version) / CARD_FILE
        try:
            card = json.loads(card_path.read_text())
        except FileNotFoundError:
            raise UnknownVersion(f"model version {version!r} not found in {self.versions_dir}") from None
        except (OSError, ValueError) as error:
            raise RegistryError(f"cannot read {card_path}: {error}") from None
        if not isinstance(card, dict) or card.get("version") != version:
            raise RegistryError(f"{card_path} is not the card of version {version!r}")
        return card

    def history(self) -> list[dict[str, Any]]:
        """Promotions and rollbacks, oldest first: {"action", "version", "previous", "at"}."""
        return _read_json_lines(self.history_file)

    def training_runs(self) -> list[dict[str, Any]]:
        """Fine-tuning runs, oldest first, as recorded by record_training_run."""
        return _read_json_lines(self.trainings_file)

    # --- changing ------------------------------------------------------------------------------------

    def publish(
        self,
        src_dir: Path | str,
        version: str | None = None,
        parent: str | None = None,
        metrics: dict[str, Any] | None = None,
        dataset_digest: str | None = None,
        extra: dict[str, Any] | None = None,
    ) -> str:
        """Copy the model directory `src_dir` into the registry as a new version; returns its name.

        Without `version` the next free "v<N>" is used. A card.json in `src_dir` is kept; version and
        created_at are always the registry's, and parent, dataset_digest and metrics override the
        card's own values only where they are given.
        """
        source = Path(src_dir)
        if not source.is_dir():
            raise RegistryError(f"cannot publish {source}: not a directory")
        if version is not None:
            _checked_name(version)
        clashes = sorted(set(extra or {}) & set(CARD_KEYS))
        if clashes:
            raise RegistryError(
                f"extra card fields {clashes} would overwrite the registry's own; pass them as arguments"
            )
        self.versions_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".incoming-", dir=self.versions_dir))
        try:
            copy = staging / "model"
            shutil.copytree(source, copy, symlinks=False)
            card = {**_read_card(copy), **(extra or {})}
            given = {"parent": parent, "dataset_digest": dataset_digest, "metrics": metrics}
            card.update({key: value for key, value in given.items() if value is not None})
            card.setdefault("metrics", {})
            with self._locked():
                name = version or self._next_version_name()
                target = self.versions_dir / name
                if target.exists():
                    raise RegistryError(f"model version {name!r} already exists in {self.versions_dir}")
                card.update(version=name, created_at=_now())
                _write_json_atomically(copy / CARD_FILE, card)
                _fsync_tree(copy)
                os.rename(copy, target)
                _fsync_dir(self.versions_dir)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        log.info("published model version %s from %s", name, source)
        return name

    def import_model(self, src_dir: Path | str, **publish_args: Any) -> str:
        """Publish `src_dir`, and promote it when nothing is served yet; returns the version."""
        version = self.publish(src_dir, **publish_args)
        with self._locked():
            if self.current() is None:
                self._set_current(version, action="promote")
        return version

    def promote(self, version: str) -> None:
        """Serve `version` from now on (workers pick it up at their next job); a no-op when it is served."""
        with self._locked():
            self.path(version)
            if self.current() == version:
                return
            if self.project is not None:
                trained_on, base = self.card(version).get("base"), self.base().current()
                if trained_on != base:
                    raise RegistryError(
                        f"adapter {version!r} of project {self.project} was trained on base {trained_on!r}, "
                        f"but the base served now is {base!r}: fine-tune the project again"
                    )
            self._set_current(version, action="promote")

    def rollback(self) -> str | None:
        """Serve the version that was promoted before the current one; returns it.

        In a project's lineage, rolling back its first adapter serves the base again (returns None)."""
        with self._locked():
            stack = self._promotion_stack()
            if self.project is not None and len(stack) == 1:
                self._clear_current()
                return None
            if len(stack) < 2:
                raise RegistryError(
                    f"nothing to roll back to: the promotion history of {self.root} holds "
                    f"{'only ' + repr(stack[0]) if stack else 'no promotion'}"
                )
            previous = stack[-2]
            self.path(previous)
            self._set_current(previous, action="rollback")
            return previous

    def record_training_run(self, run: dict[str, Any]) -> None:
        with self._locked():
            _append_json_line(self.trainings_file, run)

    # --- internals -----------------------------------------------------------------------------------

    def _locked(self) -> FileLock:
        self.root.mkdir(parents=True, exist_ok=True)
        return FileLock(self.lock_file)

    def _next_version_name(self) -> str:
        numbers = [
            int(m.group(1)) for e in self.versions_dir.iterdir() if (m := AUTO_VERSION.fullmatch(e.name))
        ]
        return f"v{max(numbers, default=0) + 1}"

    def _set_current(self, version: str, *, action: str) -> None:
        previous = self.current()
        _write_atomically(self.current_file, version + "\n")
        _append_json_line(
            self.history_file, {"action": action, "version": version, "previous": previous, "at": _now()}
        )
        log.info("%s: now serving model version %s (was %s)", action, version, previous)

    def _clear_current(self) -> None:
        previous = self.current()
        self.current_file.unlink(missing_ok=True)
        _fsync_dir(self.current_file.parent)
        _append_json_line(
            self.history_file, {"action": "rollback", "version": None, "previous": previous, "at": _now()}
        )
        log.info("rollback: project %s is served the base again (was %s)", self.project, previous)

    def _promotion_stack(self) -> list[str]:
        """Promotions push, rollbacks pop: the top is what is served, the one below is the rollback target."""
        stack: list[str] = []
        for entry in self.history():
            if entry.get("action") == "promote":
                stack.append(entry["version"])
            elif entry.get("action") == "rollback" and stack:
                stack.pop()
        return stack


def _checked_project(project: int | None) -> int | None:
    if project is not None and (not isinstance(project, int) or isinstance(project, bool) or project < 0):
        raise RegistryError(f"invalid project {project!r}: a Label Studio project id (an integer, 0 or more)")
    return project


def _checked_name(version: str) -> str:
    if not isinstance(version, str) or not VERSION_NAME.fullmatch(version):
        raise RegistryError(
            f"invalid model version name {version!r}: use letters, digits, '.', '_' and '-' "
            "(not starting with '.' or '-', at most 100 characters)"
        )
    return version


def card_version(model_dir: Path | str) -> str | None:
    """The version a model directory's own card.json names, when it is a valid version name; else None."""
    version = _read_card(Path(model_dir)).get("version")
    return version if isinstance(version, str) and VERSION_NAME.fullmatch(version) else None


def _read_card(model_dir: Path) -> dict[str, Any]:
    try:
        card = json.loads((model_dir / CARD_FILE).read_text())
    except FileNotFoundError:
        return {}
    except ValueError as error:
        raise RegistryError(f"{model_dir / CARD_FILE} is not valid JSON: {error}") from None
    return card if isinstance(card, dict) else {}


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def _write_json_atomically(path: Path, data: dict[str, Any]) -> None:
    _write_atomically(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def _write_atomically(path: Path, text: str) -> None:
    """Replace `path` atomically, and fsync its folder so that the rename itself survives a crash."""
    write_bytes_atomically(path, text.encode())
    _fsync_dir(path.parent)


def _fsync_tree(directory: Path) -> None:
    """Make a copied model durable before it becomes visible under its final name."""
    for folder, _, names in os.walk(directory):
        for name in names:
            with open(os.path.join(folder, name), "rb") as file:
                os.fsync(file.fileno())
        _fsync_dir(Path(folder))


def _fsync_dir(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _append_json_line(path: Path, entry: dict[str, Any]) -> None:
    with open(path, "a") as lines:
        lines.write(json.dumps(entry) + "\n")
        lines.flush()
        os.fsync(lines.fileno())


def _read_json_lines(path: Path) -> list[dict[str, Any]]:
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return []
    entries = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            entries.append(json.loads(line))
        except ValueError:
            log.warning("%s line %d is not JSON (an interrupted write?); ignored", path, number)
    return entries
