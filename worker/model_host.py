"""The model a worker serves: the registry's current version, loaded once, swapped when `current` changes.

Loading a region-LLM takes seconds to minutes, so a worker loads it once and keeps it; `refresh()` costs one
small file read and is called before every job. When the registry's `current` names another version (a
promotion or a rollback), the next job is served by that version without restarting the worker.

The old engine is released before the new one loads: two large models need not fit on one GPU together. If
the new version cannot be loaded, the host goes back to the old one, logs why, and does not try that version
again until `current` changes once more. Every load publishes the registry snapshot (served version plus
all cards) to Redis for the backend's /setup and /versions, which cannot read the workers' disk.

Projects (issue 22): the base is loaded once; `serve(project)` answers as the project is served now
(worker/registry.py), with its LoRA adapter when it has one. Adapters are loaded on first use into a cache
bounded in bytes of adapter weights (ROI_ADAPTER_CACHE_BYTES, least recently used evicted first), so a
project's calls after its first pay no load; switching to a loaded adapter points the language model's
layers at its ready weights (roi_model/adapters.py: no per-token cost; computed again only for an adapter
whose ready weights were dropped beyond ROI_ADAPTER_READY_BYTES).
`answer` splits a batch that mixes projects into one engine call per adapter. A worker given
`merge_project` (ROI_MERGE_PROJECT) serves that one project with its adapter merged into the weights
(no ready weights, no switching) and refuses every other project.

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
from cachetools import LRUCache

from backend import registry_snapshot
from worker.registry import ModelRegistry, RegistryError, Serving

if TYPE_CHECKING:  # torch and the model code load with the first model, not with this module
    import torch

    from roi_model.adapters import AdapterSet
    from roi_model.region_model import ImageRequest, RegionModel

log = logging.getLogger(__name__)

EngineLoader = Callable[[Path], "RegionModel"]
DEFAULT_ADAPTER_CACHE_BYTES = 1 << 30
DEFAULT_ADAPTER_READY_BYTES = 512 << 20  # roi_model.adapters.DEFAULT_READY_BYTES, without importing torch


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
        adapter_cache_bytes: int = DEFAULT_ADAPTER_CACHE_BYTES,
        adapter_ready_bytes: int = DEFAULT_ADAPTER_READY_BYTES,
        merge_project: int | None = None,
    ) -> None:
        if adapter_cache_bytes < 1:
            raise ValueError(f"the adapter cache needs at least 1 byte, got {adapter_cache_bytes}")
        self.registry = registry
        self.adapter_cache_bytes = adapter_cache_bytes
        self.adapter_ready_bytes = adapter_ready_bytes
        self.merge_project = merge_project
        self._adapters: AdapterSet | None = None
        self._cache = _AdapterCache(self, adapter_cache_bytes)
        self._merged: Serving | None = None  # what a merge_project worker serves, merged into its weights
        self._published: dict[str, str] = {}
        self.adapter_loads = 0
        self.adapter_load_seconds: list[float] = []
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
        if self.merge_project is not None and wanted == self._version and self._merged is not None:
            return self.registry.serving(self.merge_project) != self._merged
        return wanted is not None and wanted not in (self._version, self._refused)

    def refresh(self) -> bool:
        """Serve the registry's current version if it changed; True when another version was loaded.

        A registry without a current version, or a version that fails to load, leaves the served one in place.
        """
        wanted = self.registry.current()
        if wanted is None or wanted == self._refused or (wanted == self._version and not self.stale()):
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
            self._published = self.registry.served_versions()
            registry_snapshot.publish(
                self.connection, self._version, self.registry.versions(), self._published
            )
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
        if self.merge_project is not None:
            self._merge(self.registry.serving(self.merge_project))

    def _merge(self, serving: Serving | None) -> None:
        """Merge the merge_project's adapter into the loaded base (none: serve the base as it is)."""
        self._merged = serving
        if serving is None or serving.adapter is None or serving.base != self._version:
            return
        adapters = self._adapter_set()
        name = f"p{serving.project}-{serving.adapter}"
        adapters.load(name, self.registry.lineage(serving.project).path(serving.adapter))
        adapters.merge(name)
        log.warning(
            "project %s: adapter %s merged into base %s", serving.project, serving.adapter, self._version
        )

    # --- projects --------------------------------------------------------------------------------------

    def serve(self, project: int | None) -> tuple[RegionModel, str]:
        """The engine answering as `project` is served now, and the model version its answers carry.

        Costs two small file reads when the project's adapter is loaded already; loads it (and evicts the
        least recently used adapters beyond the cache's bytes) when it is not."""
        engine = self.engine
        if self.merge_project is not None:
            if project is not None and project != self.merge_project:
                raise ValueError(
                    f"this worker serves project {self.merge_project} alone, with its adapter merged in "
                    f"(ROI_MERGE_PROJECT); project {project} is served by the other workers"
                )
            merged = self._merged
            return (
                engine,
                merged.version if merged is not None and merged.base == self._version else self.version,
            )
        serving = self.registry.serving(project) if project is not None else None
        if serving is None or serving.base != self._version:
            serving = Serving(self.version, project)  # the loaded base (a new one loads before the next job)
        elif self._published.get(str(project), serving.version) != serving.version:
            self.publish()  # a promotion or a rollback since the last snapshot: the backend's /setup learns it
        if serving.adapter is None:
            if self._adapters is not None:
                self._adapters.activate(None)
            return engine, serving.version
        name = f"p{project}-{serving.adapter}"
        if self._cache.get(name) is None:
            self._load_adapter(name, serving)
        self._adapters.activate(name)
        return engine, serving.version

    def _load_adapter(self, name: str, serving: Serving) -> None:
        adapters = self._adapter_set()
        seconds = adapters.load(name, self.registry.lineage(serving.project).path(serving.adapter))
        self.adapter_loads += 1
        self.adapter_load_seconds.append(seconds)
        size = adapters.loaded[name]
        if size > self.adapter_cache_bytes:
            adapters.unload(name)
            raise ValueError(
                f"adapter {serving.version} takes {size} bytes, more than the whole adapter cache "
                f"(ROI_ADAPTER_CACHE_BYTES={self.adapter_cache_bytes})"
            )
        self._cache[name] = size  # evicts (unloads) the least recently used beyond the budget
        log.info(
            "project %s: loaded adapter %s in %.2f s (%d bytes)",
            serving.project,
            serving.adapter,
            seconds,
            size,
        )

    def answer(self, items: list[tuple[int | None, ImageRequest]]) -> list[tuple[list, str]]:
        """Answers of requests of several projects, each with its project's adapter: one engine call per
        adapter, in the order given. Returns (answers, model version) per request."""
        groups: dict[str, list[int]] = {}
        engines: dict[str, tuple[int | None, str]] = {}
        for index, (project, _) in enumerate(items):
            serving = self.registry.serving(project) if project is not None else None
            key = serving.version if serving is not None else ""
            groups.setdefault(key, []).append(index)
            engines.setdefault(key, (project, key))
        results: list[tuple[list, str]] = [None] * len(items)  # type: ignore[list-item]
        for key, indexes in groups.items():
            engine, version = self.serve(engines[key][0])
            for index, answers in zip(indexes, engine.answer([items[i][1] for i in indexes]), strict=True):
                results[index] = (answers, version)
        return results

    def adapter_stats(self) -> dict:
        return {
            "loaded": len(self._cache),
            "bytes": self._cache.currsize,
            "max_bytes": self.adapter_cache_bytes,
            "ready_bytes": self._adapters.ready_bytes_used if self._adapters is not None else 0,
            "loads": self.adapter_loads,
        }

    def _adapter_set(self) -> AdapterSet:
        if self._adapters is None:
            from roi_model.adapters import AdapterSet

            self._adapters = AdapterSet(self.engine, ready_bytes=self.adapter_ready_bytes)
        return self._adapters

    def _release(self) -> None:
        self._cache.clear_without_unloading()
        self._adapters, self._merged = None, None
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


class _AdapterCache(LRUCache):
    """Adapter name -> bytes of its weights; evicting one unloads it from the host's model."""

    def __init__(self, host: ModelHost, max_bytes: int) -> None:
        super().__init__(maxsize=max_bytes, getsizeof=lambda size: size)
        self.host = host

    def popitem(self):
        name, size = super().popitem()
        if self.host._adapters is not None:
            self.host._adapters.unload(name)
        log.info("adapter %s evicted from the adapter cache (%d bytes)", name, size)
        return name, size

    def clear_without_unloading(self) -> None:
        """Forget every entry (the model they were loaded on is being released)."""
        for name in list(self):
            del self[name]  # not popitem: nothing is unloaded


def no_current_version_message(registry: ModelRegistry) -> str:
    known = [card["version"] for card in registry.versions()]
    published = f"published versions: {', '.join(known)}" if known else "no version is published"
    return (
        f"no model version is being served: {registry.current_file} does not exist ({published}); "
        "publish a model directory into the registry and promote it (worker.registry.ModelRegistry)"
    )
