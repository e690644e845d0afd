"""LoRA adapters on the demo model's language model, made without training: random A and B matrices (peft's
init_lora_weights=False), so each seed answers differently from the base and from the other seeds."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

DEMO = Path(__file__).resolve().parents[2] / "models" / "demo"
LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def random_adapter(
    language_model: torch.nn.Module, out: Path, seed: int, rank: int = 8, scale: float = 1.0
) -> Path:
    """Write a LoRA adapter of `language_model` (left unchanged) to `out`; `scale` shrinks its B matrices
    (a small scale keeps the base's answers, for timing an adapter's cost alone)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=4 * rank, target_modules=LINEARS, init_lora_weights=False)
    model = get_peft_model(copy.deepcopy(language_model), config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.mul_(scale)
    model.save_pretrained(out)
    return out
