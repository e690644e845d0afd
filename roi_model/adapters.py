"""LoRA adapters (peft) on a served region-LLM: several loaded beside one base, one active at a time.

A project's fine-tune (roi_model.training with `adapter_only`) trains LoRA on the language model's linear
layers and nothing else, and writes the adapter alone (adapter_config.json, adapter_model.safetensors). The
vision tower, projector and region encoder stay the base's, so the engine's image features are the same
under every adapter and its feature cache is shared; the prefix KV cache depends on the language model's
weights, so it is keyed by the active adapter (RegionEngine.variant).

`AdapterSet` loads adapters by name into the engine's language model (peft's load_adapter), switches
between them (set_adapter; `None` switches them all off: the base's own answers, bit for bit), deletes
them (delete_adapter), and can merge one into the weights for a worker that serves a single project
(merge_and_unload: no adapter cost at all, but the base is gone from that worker).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch
from safetensors import safe_open

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


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
    """The adapters loaded on one engine's language model (a RegionEngine: GPT4RoI family)."""

    def __init__(self, engine) -> None:
        if getattr(engine, "family", None) != "region_llm":
            raise AdapterError(
                f"per-project adapters are served on region-LLM (GPT4RoI family) models; this base is "
                f"{getattr(engine, 'family', type(engine).__name__)!r}: use the global lineage "
                "(ROI_FINETUNE_LINEAGE=global)"
            )
        self.engine = engine
        self._peft = None  # the peft wrapper, created with the first adapter
        self.loaded: dict[str, int] = {}  # name -> bytes of its weights on the device
        self.active: str | None = None
        self.merged: str | None = None

    def load(self, name: str, directory: str | Path) -> float:
        """Load the adapter of `directory` under `name` (inactive); returns the seconds it took."""
        if self.merged is not None:
            raise AdapterError(f"adapter {self.merged!r} is merged into this model: no other can be loaded")
        if name in self.loaded:
            return 0.0
        check_adapter_dir(directory)
        started = time.monotonic()
        language_model = self.engine.model.language_model
        if self._peft is None:
            from peft import PeftModel

            self._peft = PeftModel.from_pretrained(
                language_model, str(directory), adapter_name=name, is_trainable=False
            )
        else:
            self._peft.load_adapter(str(directory), adapter_name=name, is_trainable=False)
        self._peft.to(self.engine.device)
        self.loaded[name] = sum(
            parameter.numel() * parameter.element_size()
            for parameter_name, parameter in self._peft.named_parameters()
            if f".{name}." in parameter_name
        )
        self.activate(self.active)  # peft may have switched to the new one: keep what was active
        return time.monotonic() - started

    def unload(self, name: str) -> None:
        if name not in self.loaded:
            return
        if self.active == name:
            self.activate(None)
        if len(self.loaded) == 1:
            self.engine.model.language_model = self._peft.unload()  # the base's own modules back
            self._peft = None
        else:
            self._peft.delete_adapter(name)
            self.activate(self.active)
        del self.loaded[name]
        self.engine.forget_variant(name)

    def activate(self, name: str | None) -> None:
        """Answer with adapter `name` from now on; None: with the base alone."""
        if name is not None and name not in self.loaded:
            raise AdapterError(f"adapter {name!r} is not loaded (loaded: {', '.join(self.loaded) or 'none'})")
        if self.merged is not None and name != self.merged:
            raise AdapterError(f"this model has adapter {self.merged!r} merged in: it answers only as that")
        if self._peft is not None:
            tuner = self._peft.base_model
            if name is None:
                tuner.disable_adapter_layers()
            else:
                tuner.enable_adapter_layers()
                tuner.set_adapter(name)
        self.active = name
        self.engine.variant = name or ""

    def merge(self, name: str) -> None:
        """Merge the loaded adapter `name` into the weights and drop every adapter (merge_and_unload)."""
        if name not in self.loaded:
            raise AdapterError(f"adapter {name!r} is not loaded")
        for other in [other for other in self.loaded if other != name]:
            self.unload(other)
        self.activate(name)
        self.engine.model.language_model = self._peft.merge_and_unload()
        self._peft = None
        self.loaded = {}
        self.merged = name
