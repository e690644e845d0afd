"""Loading a model directory (offline): device, dtype, attention kernel and optional quantization.

- device: "auto" (the first GPU when there is one, else the CPU), "cpu", "cuda", "cuda:1" ...; the
  weights go straight onto it, so a 7B model never sits in CPU memory first. One model, one
  device: a worker serves one GPU.
- dtype: "auto" (bfloat16 on GPUs that have it, float16 on older ones, float32 on the CPU) or a name.
- attention: "sdpa" (PyTorch's fused kernels) by default, "eager", or "flash_attention_2" where installed.
- quantization: "8bit" or "4bit" (NF4) for the language model's linear layers through bitsandbytes;
  the vision tower, projector, region encoder and output head keep `dtype`.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch
from transformers import AutoTokenizer, BitsAndBytesConfig

from .modeling import RegionLLMForCausalLM
from .processing import RegionProcessor

logger = logging.getLogger(__name__)

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
QUANTIZATIONS = ("8bit", "4bit")
ATTENTION = ("sdpa", "eager", "flash_attention_2")
# Not quantized: small, precision-sensitive, or not plain transformer linears.
KEEP_UNQUANTIZED = ["vision_tower", "mm_projector", "region_encoder", "lm_head"]


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    if device in (None, "auto"):
        return (
            torch.device("cuda", torch.cuda.current_device())
            if torch.cuda.is_available()
            else torch.device("cpu")
        )
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device} was asked for, but this machine has no CUDA device")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        elif device.index >= torch.cuda.device_count():
            raise ValueError(f"device {device} does not exist: {torch.cuda.device_count()} CUDA device(s)")
    return device


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def quantization_config(kind: str | None, device: torch.device, compute_dtype: torch.dtype):
    """A BitsAndBytesConfig for the language model, or None. Checks bitsandbytes and CUDA first."""
    if kind is None:
        return None
    if kind not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {kind!r}; use {' or '.join(QUANTIZATIONS)}")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError(
            f"{kind} loading needs bitsandbytes, which is not installed: pip install bitsandbytes (on a CUDA machine)"
        )
    if device.type != "cuda":
        raise ValueError(f"{kind} loading runs on a CUDA device; the device here is {device}")
    if kind == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=KEEP_UNQUANTIZED)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=compute_dtype,
        llm_int8_skip_modules=KEEP_UNQUANTIZED,
    )


def load_pretrained(
    directory: str | Path,
    *,
    device: str | torch.device | None = "auto",
    dtype: str | torch.dtype | None = "auto",
    attention: str = "sdpa",
    quantization: str | None = None,
) -> tuple[RegionLLMForCausalLM, RegionProcessor]:
    """The model (in eval mode) and its processor, placed and typed for inference. Offline."""
    if attention not in ATTENTION:
        raise ValueError(f"unknown attention {attention!r}; use {', '.join(ATTENTION)}")
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    quantization_settings = quantization_config(quantization, device, dtype)
    model = RegionLLMForCausalLM.from_pretrained(
        directory,
        dtype=dtype,
        # the language model only: a convolutional vision tower has no attention to choose
        attn_implementation={"text_config": attention},
        device_map={"": device} if device.type == "cuda" else None,
        quantization_config=quantization_settings,
        local_files_only=True,
    )
    if device.type == "cpu":
        _own_memory(model)
    model.eval()
    logger.info(
        "loaded %s on %s as %s (%s attention, quantization %s)",
        directory,
        device,
        dtype,
        attention,
        quantization,
    )
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    return model, RegionProcessor(tokenizer, model.config, model.num_image_tokens)


@torch.no_grad()
def _own_memory(model: torch.nn.Module) -> None:
    """Copy weights out of the memory-mapped checkpoint into ordinary (aligned) tensors.

    Tensors mapped at unaligned file offsets take other BLAS code paths, and the logits would
    differ in their last bits from those of the model that was saved.
    """
    for tensor in [*model.parameters(), *model.buffers()]:
        tensor.data = tensor.data.clone()
