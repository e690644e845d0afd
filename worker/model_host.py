"""The model a worker serves: the registry's current version, loaded once, swapped when `current` changes.

Loading a region-LLM takes seconds to minutes, so a worker loads it once and keeps it; `refresh()` costs one
small file read and is called before every job. When the registry's `current` names another version (a
promotion or a rollback), the next job is served by that version without restarting the worker.

The old engine is released before the new one loads: two large models need not fit on one GPU together. If
the new version cannot be loaded, the host goes back to the old one, logs why, and does not try that version
again until `current` changes once more. Every load publishes the registry snapshot (served version plus
all cards) to Redis for the backend's /setup and /versions, which cannot read the workers' disk.

Job functions reach the host of their process through worker.process_context.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import redis

from backend import registry_snapshot
from worker.registry import ModelRegistry, RegistryError

if TYPE_CHECKING:  # torch and the model code load with the first model, not with this module
    import torch

    from roi_model.region_model import RegionModel

log = logging.getLogger(__name__)

EngineLoader = Callable[[Path], "RegionModel"]


class NoModelServed(RuntimeError):
    """The registry has no current version (or it cannot be loaded); the message says what to do."""


class ModelHost:
    def __init__(
        self,
        registry: ModelRegistry,
        *,
        device: str = "cpu",
        dtype: torch.dtype | None = None,
        connection: redis.Redis | None = None,
        loader: EngineLoader | None = None,
    ) -> None:
        self.registry = registry
        self.device = device
        self.dtype = dtype
        self.connection = connection
        self._loader = loader or self._load_engine
        self._engine: RegionModel | None = None
        self._version: str | None = None
        self._refused: str | None = None  # a version that failed to load; not retried until `current` moves
        self.loading = False  # read by the heartbeat thread

    @property
    def version(self) -> str:
        if self._version is None:
            raise NoModelServed("no model is loaded yet: call ModelHost.load() first")
        return self._version

    @property
    def engine(self) -> RegionModel:
        if self._engine is None:
            raise NoModelServed("no model is loaded yet: call ModelHost.load() first")
        return self._engine

    @property
    def served_version(self) -> str | None:
        """The loaded version, None before the first load (for status reports)."""
        return self._version

    def load(self) -> str:
        """Load the registry's current version; raises NoModelServed when there is none or it cannot load."""
        wanted = self.registry.current()
        if wanted is None:
            raise NoModelServed(no_current_version_message(self.registry))
        try:
            self._swap_to(wanted)
        except (RegistryError, OSError, ValueError) as error:
            raise NoModelServed(f"model version {wanted!r} cannot be loaded: {error}") from error
        self.publish()
        return wanted

    def stale(self) -> bool:
        """True when the registry's current version is one that `refresh()` would load."""
        wanted = self.registry.current()
        return wanted is not None and wanted not in (self._version, self._refused)

    def refresh(self) -> bool:
        """Serve the registry's current version if it changed; True when another version was loaded.

        A registry without a current version, or a version that fails to load, leaves the served one in place.
        """
        wanted = self.registry.current()
        if wanted is None or wanted in (self._version, self._refused):
            return False
        previous = self._version
        try:
            self._swap_to(wanted)
        except Exception as error:  # anything a broken model directory raises
            log.error("model version %s cannot be loaded (%s); still serving %s", wanted, error, previous)
            self._refused = wanted
            if previous is not None:
                self._swap_to(previous)
            return False
        self._refused = None
        self.publish()
        log.warning("now serving model version %s (was %s)", wanted, previous)
        return True

    def publish(self) -> None:
        """Write the registry snapshot (served version and all cards) to Redis, when there is a connection."""
        if self.connection is None:
            return
        try:
            registry_snapshot.publish(self.connection, self._version, self.registry.versions())
        except redis.RedisError as error:
            log.warning("could not publish the model registry snapshot: %s", error)

    def _swap_to(self, version: str) -> None:
        directory = self.registry.path(version)
        self._release()
        self.loading = True
        started = time.monotonic()
        try:
            engine = self._loader(directory)
        finally:
            self.loading = False
        self._engine, self._version = engine, version
        log.info("loaded model version %s from %s in %.1f s", version, directory, time.monotonic() - started)

    def _release(self) -> None:
        if self._engine is None:
            return
        on_cuda = self._engine.device.type == "cuda"
        self._engine, self._version = None, None
        gc.collect()
        if on_cuda:
            import torch

            torch.cuda.empty_cache()

    def _load_engine(self, directory: Path) -> RegionModel:
        from roi_model.families import load_region_model  # the family from config.json's model_type

        return load_region_model(directory, device=self.device, dtype=self.dtype)


def no_current_version_message(registry: ModelRegistry) -> str:
    known = [card["version"] for card in registry.versions()]
    published = f"published versions: {', '.join(known)}" if known else "no version is published"
    return (
        f"no model version is being served: {registry.current_file} does not exist ({published}); "
        "publish a model directory into the registry and promote it (worker.registry.ModelRegistry)"
    )
