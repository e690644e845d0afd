"""Writing a model directory from planned tensors, after checking them against the model they are for.

Both converters end here. The planned tensors must be exactly the state dict of the
`RegionLLMForCausalLM` the config describes — the same names and shapes, nothing missing and
nothing extra — before a byte is written. The directory is assembled beside its destination and
renamed into place, so a failed conversion leaves nothing behind.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import GenerationConfig, PreTrainedTokenizerBase

from ..configuration import RegionLLMConfig
from ..modeling import RegionLLMForCausalLM
from .checkpoint_files import CheckpointError, PlannedTensor, WrittenWeights, write_safetensors_shards

DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3
SHOWN = 5  # names listed per kind of problem in an error message


def meta_model(config: RegionLLMConfig) -> RegionLLMForCausalLM:
    """The model's structure without its memory: names and shapes of a 7B model cost nothing."""
    with torch.device("meta"):
        return RegionLLMForCausalLM(config)


def expected_tensors(model: RegionLLMForCausalLM) -> dict[str, tuple[int, ...]]:
    """What a checkpoint of `model` holds: its state dict, less the weights tied to another one."""
    tied = set(model.all_tied_weights_keys)
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items() if name not in tied}


def check_plan(tensors: Sequence[PlannedTensor], expected: dict[str, tuple[int, ...]]) -> None:
    """Raise CheckpointError unless `tensors` are exactly the expected names and shapes."""
    planned: dict[str, PlannedTensor] = {}
    for tensor in tensors:
        if tensor.name in planned:
            raise CheckpointError(
                f"two source tensors map to {tensor.name}: {planned[tensor.name].origin} and {tensor.origin}"
            )
        planned[tensor.name] = tensor
    problems = []
    unknown = [tensor for name, tensor in planned.items() if name not in expected]
    if unknown:
        problems.append(
            "tensors the model does not have: "
            + ", ".join(f"{tensor.origin} (as {tensor.name})" for tensor in unknown[:SHOWN])
        )
    wrong = [
        tensor for name, tensor in planned.items() if name in expected and tensor.shape != expected[name]
    ]
    if wrong:
        problems.append(
            "shape mismatches: "
            + ", ".join(
                f"{tensor.origin} is {list(tensor.shape)}, {tensor.name} needs {list(expected[tensor.name])}"
                for tensor in wrong[:SHOWN]
            )
        )
    missing = [name for name in expected if name not in planned]
    if missing:
        problems.append("no source for: " + ", ".join(missing[:SHOWN]))
    if problems:
        counts = f"({len(unknown)} unknown, {len(wrong)} mismatched, {len(missing)} missing)"
        raise CheckpointError(f"the checkpoint does not fit the model {counts}: " + "; ".join(problems))


def parameter_counts(tensors: Sequence[PlannedTensor]) -> dict[str, int]:
    """Parameters per top-level part of the model (vision_tower, mm_projector, ...) and in total."""
    counts: dict[str, int] = {}
    for tensor in tensors:
        part = tensor.name.split(".", 1)[0]
        counts[part] = counts.get(part, 0) + int(torch.Size(tensor.shape).numel())
    counts["total"] = sum(counts.values())
    return counts


def write_model_directory(
    out: str | Path,
    *,
    config: RegionLLMConfig,
    tokenizer: PreTrainedTokenizerBase,
    generation_config: GenerationConfig,
    tensors: Sequence[PlannedTensor],
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    card: dict | None = None,
) -> WrittenWeights:
    """Check the plan, then write weights, config, generation config, tokenizer and `card` (card.json, which
    the registry keeps on import) to `out` (new or empty)."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(
            f"{out} already exists and is not an empty directory; choose a new output directory"
        )
    check_plan(tensors, expected_tensors(meta_model(config)))
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        written = write_safetensors_shards(staging, tensors, max_shard_bytes)
        config.architectures = [RegionLLMForCausalLM.__name__]
        config.save_pretrained(staging)
        generation_config.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if card is not None:
            (staging / "card.json").write_text(json.dumps(card, indent=2) + "\n")
        if out.exists():
            out.rmdir()
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return written
