"""LoRA adapters (peft) on a served region-LLM: several loaded beside one base, one active at a time.

A project's fine-tune (roi_model.training with `adapter_only`) trains LoRA on the language model's linear
layers and nothing else, and writes the adapter alone (adapter_config.json, adapter_model.safetensors). The
vision tower, projector and region encoder stay the base's, so the engine's image features are the same
under every adapter and its feature cache is shared; the prefix KV cache depends on the language model's
weights, so it is keyed by the active adapter (RegionEngine.variant).

`AdapterSet` loads adapters by name (peft's adapter files and config), switches between them (`None`:
the base's own answers, bit for bit), unloads them, and can merge one into the weights for a worker that
serves a single project (no adapter cost at all, but the base is gone from that worker).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
DEFAULT_READY_BYTES = 512 << 20


class AdapterError(ValueError):
    """An adapter cannot be loaded or used here; the message says why."""


def is_adapter_dir(directory: str | Path) -> bool:
    return (Path(directory) / ADAPTER_CONFIG).is_file()


def check_adapter_dir(directory: str | Path) -> None:
    """AdapterError unless `directory` is a LoRA adapter that changes nothing but LoRA weights."""
    directory = Path(directory)
    if not is_adapter_dir(directory):
        raise AdapterError(f"{directory} is not a peft adapter directory (no {ADAPTER_CONFIG})")
    config = json.loads((directory / ADAPTER_CONFIG).read_text())
    if config.get("peft_type") != "LORA" or config.get("modules_to_save"):
        raise AdapterError(
            f"{directory}: only LoRA adapters without modules_to_save are served "
            f"(peft_type {config.get('peft_type')!r}, modules_to_save {config.get('modules_to_save')!r})"
        )
    with safe_open(str(directory / ADAPTER_WEIGHTS), framework="pt") as weights:
        foreign = [key for key in weights.keys() if ".lora_" not in key]  # noqa: SIM118 (safe_open has no __iter__)
    if foreign:
        raise AdapterError(
            f"{directory}: the adapter holds weights that are not LoRA's ({foreign[0]} and {len(foreign) - 1} "
            "more): it would change the shared base"
        )


def weights_digest(directory: str | Path) -> str:
    """sha256 over a model directory's weight files (*.safetensors, *.bin), in name order."""
    digest = hashlib.sha256()
    files = sorted(
        path
        for path in Path(directory).iterdir()
        if path.suffix in (".safetensors", ".bin") and path.is_file()
    )
    if not files:
        raise AdapterError(f"{directory} holds no weight files")
    for path in files:
        digest.update(path.name.encode())
        with path.open("rb") as data:
            for block in iter(lambda: data.read(1 << 20), b""):
                digest.update(block)
    return "sha256:" + digest.hexdigest()


def parameters_digest(module: torch.nn.Module) -> str:
    """sha256 over a module's parameters and buffers as they are in memory (names, dtypes, values)."""
    digest = hashlib.sha256()
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return "sha256:" + digest.hexdigest()


class AdapterSet:
    """The adapters loaded on one engine's language model (a RegionEngine: GPT4RoI family).

    Serving swaps weights rather than wrapping layers: peft's LoRA layers add a few Python calls to every
    linear layer at every token, which on a small model costs more than the layer itself (measured on the
    demo model: 2.3x the base's interactive latency with an adapter active, 1.5x with the adapters switched
    off). Here each adapter is kept as its peft weights (A, B and the scale per layer, peft's
    load_peft_weights); activating one points each targeted layer at that adapter's *ready weights*,
    W + scale * B @ A, computed at its first activation; activating None points every layer back at the
    base's own weight tensors, untouched, so the base answers bit for bit.

    Ready weights are one more copy of the targeted layers per adapter, so they are kept for the most
    recently activated adapters within `ready_bytes` (always at least the active one's): where several fit
    (a small model, a large GPU), switching between them is a pointer swap; beyond it the least recently
    used adapter's buffers are rewritten for the next one (r multiply-adds per weight: on the demo model on
    one CPU thread, 0.14 ms more per switch than a pointer swap; benchmarks/adapters.py).
    """

    def __init__(self, engine, *, ready_bytes: int = DEFAULT_READY_BYTES) -> None:
        if getattr(engine, "family", None) != "region_llm":
            raise AdapterError(
                f"per-project adapters are served on region-LLM (GPT4RoI family) models; this base is "
                f"{getattr(engine, 'family', type(engine).__name__)!r}: use the global lineage "
                "(ROI_FINETUNE_LINEAGE=global)"
            )
        self.engine = engine
        self._layers = dict(engine.model.language_model.named_modules())  # looked up at every switch
        self._deltas: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor, float]]] = {}
        self._base: dict[str, torch.nn.Parameter] = {}  # layer name -> the base's own weight
        # adapter name -> {layer name: W + scale * B @ A}, least recently activated first
        self._ready: OrderedDict[str, dict[str, torch.nn.Parameter]] = OrderedDict()
        self.ready_bytes = ready_bytes
        self.loaded: dict[str, int] = {}  # name -> bytes of its weights on the device
        self.active: str | None = None
        self.merged: str | None = None

    @property
    def ready_bytes_used(self) -> int:
        return sum(_bytes_of(weights.values()) for weights in self._ready.values())

    def load(self, name: str, directory: str | Path) -> float:
        """Load the adapter of `directory` under `name` (inactive); returns the seconds it took."""
        from peft import LoraConfig
        from peft.utils import load_peft_weights

        if self.merged is not None:
            raise AdapterError(f"adapter {self.merged!r} is merged into this model: no other can be loaded")
        if name in self.loaded:
            return 0.0
        check_adapter_dir(directory)
        started = time.monotonic()
        config = LoraConfig.from_pretrained(str(directory))
        if config.use_dora or config.rank_pattern or config.alpha_pattern or config.fan_in_fan_out:
            raise AdapterError(f"{directory}: DoRA, per-layer ranks and fan_in_fan_out are not served")
        scale = config.lora_alpha / (math.sqrt(config.r) if config.use_rslora else config.r)
        weights = load_peft_weights(str(directory), device=str(self.engine.device))
        layers = self._layers
        deltas = {}
        for key, down in weights.items():
            if not key.endswith(".lora_A.weight"):
                continue
            layer_name = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            layer = layers.get(layer_name)
            up = weights.get(key.replace(".lora_A.", ".lora_B."))
            if not isinstance(layer, torch.nn.Linear) or up is None:
                raise AdapterError(
                    f"{directory}: {layer_name} is not a linear layer of this base's language model"
                )
            weight = self._base.get(layer_name, layer.weight)
            if (up.shape[0], down.shape[1]) != tuple(weight.shape):
                raise AdapterError(
                    f"{directory}: {layer_name} is {tuple(weight.shape)} in the base, "
                    f"{(up.shape[0], down.shape[1])} in the adapter (trained on another base?)"
                )
            deltas[layer_name] = (down.to(weight.dtype), up.to(weight.dtype), scale)
        self._deltas[name] = deltas
        self.loaded[name] = _bytes_of(tensor for down, up, _ in deltas.values() for tensor in (down, up))
        return time.monotonic() - started

    def unload(self, name: str) -> None:
        if name not in self.loaded:
            return
        if self.active == name:
            self.activate(None)
        del self._deltas[name], self.loaded[name]
        self._ready.pop(name, None)
        self.engine.forget_variant(name)

    @torch.no_grad()
    def activate(self, name: str | None) -> None:
        """Answer with adapter `name` from now on; None: with the base alone."""
        if name is not None and name not in self.loaded and name != self.merged:
            raise AdapterError(f"adapter {name!r} is not loaded (loaded: {', '.join(self.loaded) or 'none'})")
        if self.merged is not None and name != self.merged:
            raise AdapterError(f"this model has adapter {self.merged!r} merged in: it answers only as that")
        if name == self.active:
            return
        layers = self._layers
        if self.active is not None and self.merged is None:  # its layers back to the base's own weights
            for layer_name in self._deltas[self.active]:
                layers[layer_name].weight = self._base[layer_name]
        if name is not None and self.merged is None:
            ready = self._ready.get(name)
            if ready is None:
                ready = self._make_ready(name)
            self._ready.move_to_end(name)
            for layer_name, weight in ready.items():
                layers[layer_name].weight = weight
        self.active = name
        self.engine.variant = name or ""

    def _make_ready(self, name: str) -> dict[str, torch.nn.Parameter]:
        """Compute adapter `name`'s ready weights, in the buffers of the adapters it evicts where they fit."""
        deltas = self._deltas[name]
        for layer_name in deltas:
            self._base.setdefault(layer_name, self._layers[layer_name].weight)
        needed = _bytes_of(self._base[layer_name] for layer_name in deltas)
        spare: dict[str, torch.nn.Parameter] = {}
        while self._ready and self.ready_bytes_used + needed > self.ready_bytes:
            _, evicted = self._ready.popitem(last=False)
            spare.update(evicted)
        ready = {}
        for layer_name, (down, up, scale) in deltas.items():
            base = self._base[layer_name]
            weight = spare.pop(layer_name, None)
            if weight is None:
                weight = torch.nn.Parameter(torch.empty_like(base), requires_grad=False)
            torch.addmm(base, up, down, alpha=scale, out=weight.data)
            ready[layer_name] = weight
        self._ready[name] = ready
        return ready

    @torch.no_grad()
    def merge(self, name: str) -> None:
        """Add the loaded adapter `name` to the base's weights for good and drop every adapter."""
        if name not in self.loaded:
            raise AdapterError(f"adapter {name!r} is not loaded")
        self.activate(None)  # every layer on the base's own weight again
        layers = self._layers
        for layer_name, (down, up, scale) in self._deltas[name].items():
            layers[layer_name].weight.data.addmm_(up, down, alpha=scale)
        for other in list(self.loaded):
            self.unload(other)
        self.merged = name
        self.active = name
        self.engine.variant = name


def _bytes_of(tensors: Iterable[torch.Tensor]) -> int:
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors)
