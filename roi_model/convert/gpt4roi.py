"""GPT4RoI-7B's released weights into a region-LLM model directory.

The release (`shilongz/GPT4RoI-7B-delta-V0`) is a delta over LLaMA-1 7B in the LLaVA-v0 layout:
- LLaMA tensors (`model.embed_tokens`, `model.layers.N.*`, `model.norm`, `lm_head`) hold
  target - base. The vocabulary grew from 32000 to 32006 ([PAD], <im_patch>, <bbox>, <point>,
  <im_start>, <im_end>); the new embedding rows are stored as absolute values, so the base is added
  to the first rows only. This is what GPT4RoI's scripts/apply_delta.py does.
- `model.mm_projector.*` and `model.spi_module.*` (the region encoder) are absolute.
- `rotary_emb.inv_freq` buffers are not weights (RoPE is rebuilt from the config) and are dropped.
- The CLIP ViT-L/14 tower is not in the checkpoint; it comes from its own directory.

The model directory sees its inputs as GPT4RoI did (config: tokenization, image_resize,
region_binding), its generation_config.json holds the official demo's sampling settings, and its
card.json records them with what was verified of the LLaMA base (llama_base.py).

Conversion goes tensor by tensor (add the base, rename, cast, write), so a 7B model converts in
the memory of one output shard. Every delta tensor must map to a tensor of our model and every
tensor of our model must have a source; otherwise the conversion stops and says which.
"""

from __future__ import annotations

import json
import logging
import math
import re
from functools import partial
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, PreTrainedTokenizerBase

from ..assembly import add_special_tokens, default_generation_config
from ..configuration import SPECIAL_TOKENS, RegionLLMConfig
from .checkpoint_files import CheckpointError, CheckpointReader, PlannedTensor
from .llama_base import check_base
from .model_directory import DEFAULT_MAX_SHARD_BYTES, parameter_counts, write_model_directory
from .vision_source import VisionSource

logger = logging.getLogger(__name__)

PAD_TOKEN = "[PAD]"
GRID = 16  # GPT4RoI asserts a 16x16 patch grid: CLIP ViT-L/14 at 224 px
LEVELS = 4  # its RoI strides (14/8, 14/4, 14/2, 14) are written for four levels
PYRAMID_SCALES = [8.0, 4.0, 2.0, 1.0]
NORM_GROUPS = 64  # GroupNorm(64) of its fusion convs: fixed in its code, not visible in the weights
LEVEL_STEP = 3  # its levels are hidden_states[select_layer::-3], the last four

ABSOLUTE_PREFIXES = ("model.mm_projector.", "model.spi_module.")
GROWN_VOCABULARY = ("model.embed_tokens.weight", "lm_head.weight")
ROTARY_BUFFER = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")
SPI = r"^model\.spi_module\."
RENAMES = [
    (re.compile(r"^model\.mm_projector\.(weight|bias)$"), r"mm_projector.\1"),
    (
        re.compile(SPI + r"mlvl_fuse\.input_conv\.(\d+)\.(weight|bias)$"),
        r"region_encoder.fusion.input_convs.\1.\2",
    ),
    (
        re.compile(SPI + r"mlvl_fuse\.fuse_convs\.(\d+)\.conv\.weight$"),
        r"region_encoder.fusion.rounds.\1.conv.weight",
    ),
    (
        re.compile(SPI + r"mlvl_fuse\.fuse_convs\.(\d+)\.gn\.(weight|bias)$"),
        r"region_encoder.fusion.rounds.\1.norm.\2",
    ),
    (re.compile(SPI + r"roi_align\.pconvs\.(\d+)\.(weight|bias)$"), r"region_encoder.level_convs.\1.\2"),
    (
        re.compile(SPI + r"roi_align\.pos_embedd\.([0235])\.(weight|bias)$"),
        r"region_encoder.position_mlp.\1.\2",
    ),
    (re.compile(SPI + r"roi_align\.flatten_linear\.(weight|bias)$"), r"region_encoder.flatten_linear.\1"),
    (re.compile(SPI + r"roi_align\.updims\.(weight|bias)$"), r"region_encoder.project.\1"),
    (
        re.compile(r"^(model\.(?:embed_tokens|norm)\.weight|model\.layers\.\d+\..+|lm_head\.weight)$"),
        r"language_model.\1",
    ),
]
# LlamaConfig fields read from the delta's config.json (a LLaVA config around a LLaMA one).
REQUIRED_LLAMA_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
)
OPTIONAL_LLAMA_FIELDS = (
    "num_key_value_heads",
    "max_position_embeddings",
    "rms_norm_eps",
    "hidden_act",
    "initializer_range",
    "bos_token_id",
    "eos_token_id",
)
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# GPT4RoI's demo (gpt4roi/app.py): sampling at temperature 0.2, up to 1024 new tokens, stopping at "###".
OFFICIAL_GENERATION = {"do_sample": True, "temperature": 0.2, "max_new_tokens": 1024}
# How GPT4RoI saw its inputs (RegionLLMConfig documents each).
GPT4ROI_INPUTS = {
    "tokenization": "split_at_added_tokens",
    "image_resize": "shortest_edge_then_stretch",
    "region_binding": "by_position",
}


def our_name(delta_name: str) -> str | None:
    """Our model's name for a delta tensor; None for a tensor GPT4RoI's checkpoint does not have."""
    for pattern, replacement in RENAMES:
        if pattern.match(delta_name):
            return pattern.sub(replacement, delta_name)
    return None


def convert_gpt4roi(
    delta: str | Path,
    base: str | Path,
    clip: str | Path,
    out: str | Path,
    *,
    dtype: torch.dtype | str = torch.float16,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> dict:
    """Apply the delta to the LLaMA base, add the CLIP tower and write our model directory to `out`.

    Returns a summary: parameter counts, files written, tensors dropped, peak bytes buffered.
    """
    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    delta_dir = Path(delta)
    delta_reader = CheckpointReader(delta_dir, "--delta")
    base_reader = CheckpointReader(base, "--base")
    vision = VisionSource.open(clip, "--clip")
    llava_config = _read_json(delta_dir / "config.json", "--delta")

    config = _region_config(llava_config, delta_reader, vision)
    config.dtype = dtype
    tokenizer = _delta_tokenizer(delta_dir, config)

    tensors, dropped = _delta_tensors(delta_reader, base_reader, dtype)
    tensors += vision.planned_tensors(dtype)
    base_check = check_base(base_reader, llava_config)
    written = write_model_directory(
        out,
        config=config,
        tokenizer=tokenizer,
        generation_config=default_generation_config(config, tokenizer, **OFFICIAL_GENERATION),
        tensors=tensors,
        max_shard_bytes=max_shard_bytes,
        card=_card(base_check),
    )
    return {
        "out": str(out),
        "dtype": str(dtype).removeprefix("torch."),
        "parameters": parameter_counts(tensors),
        "tensors": len(tensors),
        "dropped": dropped,
        "files": written.files,
        "bytes": written.total_bytes,
        "peak_buffered_bytes": written.peak_buffered_bytes,
        "base_check": base_check,
    }


def _card(base_check: dict) -> dict:
    """What the registry keeps about this model (card.json): where it comes from and how it was meant to run."""
    return {
        "source": {
            "delta": "shilongz/GPT4RoI-7B-delta-V0",
            "base": "LLaMA-1 7B",
            "vision": "openai/clip-vit-large-patch14",
        },
        "licence": "non-commercial research only (GPT4RoI: CC BY-NC 4.0; a derivative of LLaMA-1)",
        "official_generation": {**OFFICIAL_GENERATION, "stop_strings": ["###"]},
        "served_generation": (
            "greedy, max_new_tokens from the request (48 by default); an answer the limit cut off is marked "
            "truncated. generation_config.json holds the official settings, for model.generate"
        ),
        "inputs": GPT4ROI_INPUTS,
        "base_check": base_check,
    }


# config ---------------------------------------------------------------------------------------------------
def _read_json(path: Path, role: str) -> dict:
    if not path.exists():
        raise CheckpointError(f"{role} {path.parent} has no {path.name}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{role} {path} is not valid JSON: {error}") from error


def _region_config(llava: dict, delta: CheckpointReader, vision: VisionSource) -> RegionLLMConfig:
    """Our config: LLaMA from config.json, region encoder widths from the delta's tensor shapes."""
    missing = [field for field in REQUIRED_LLAMA_FIELDS if field not in llava]
    if missing:
        raise CheckpointError(f"--delta config.json lacks {', '.join(missing)}")
    if not llava.get("mm_use_im_start_end", False):
        raise CheckpointError(
            "--delta config.json: mm_use_im_start_end is not true; GPT4RoI-7B uses <im_start>/<im_end>"
        )
    clip_width = vision.config.hidden_size
    if llava.get("mm_hidden_size", clip_width) != clip_width:
        raise CheckpointError(
            f"--clip has width {clip_width}, but the delta was trained on a vision tower of width {llava['mm_hidden_size']} "
            f"({llava.get('mm_vision_tower', 'openai/clip-vit-large-patch14')})"
        )
    if vision.grid != GRID:
        raise CheckpointError(
            f"--clip makes a {vision.grid}x{vision.grid} patch grid; GPT4RoI needs {GRID}x{GRID} "
            "(CLIP ViT-L/14 at 224 px, openai/clip-vit-large-patch14)"
        )
    text = LlamaConfig(
        **{field: llava[field] for field in REQUIRED_LLAMA_FIELDS + OPTIONAL_LLAMA_FIELDS if field in llava},
        tie_word_embeddings=False,
    )
    select_layer = llava.get("mm_vision_select_layer", -2)
    return RegionLLMConfig(
        vision_config=vision.config.to_dict(),
        text_config=text.to_dict(),
        image_size=vision.config.image_size,
        image_mean=vision.image_mean,
        image_std=vision.image_std,
        vision_feature_layer=select_layer,
        region_feature_layers=[select_layer - LEVEL_STEP * step for step in reversed(range(LEVELS))],
        region_pyramid_scales=list(PYRAMID_SCALES),
        region_norm_groups=NORM_GROUPS,
        projector_type="linear",
        template="gpt4roi_v0",
        stop_strings=["###"],
        **GPT4ROI_INPUTS,
        **_region_widths(delta),
    )


def _region_widths(delta: CheckpointReader) -> dict:
    """The region encoder's sizes, read off its weights (GPT4RoI-7B: 1024 wide, 5 rounds, 14x14 RoIs)."""

    def shape(name: str) -> tuple[int, ...]:
        full = "model.spi_module." + name
        if full not in delta:
            raise CheckpointError(f"--delta has no {full}; is it GPT4RoI's checkpoint?")
        return delta.shape(full)

    def count(pattern: str) -> int:
        return sum(1 for name in delta.names() if re.match(SPI + pattern, name))

    levels = count(r"mlvl_fuse\.input_conv\.\d+\.weight$")
    if levels != LEVELS:
        raise CheckpointError(f"--delta has {levels} region levels (input_conv.N); GPT4RoI has {LEVELS}")
    embed_dim = shape("mlvl_fuse.input_conv.0.weight")[0]
    hidden, flattened = shape("roi_align.flatten_linear.weight")
    roi_size = math.isqrt(flattened // embed_dim)
    if roi_size * roi_size * embed_dim != flattened:
        raise CheckpointError(
            f"--delta flatten_linear takes {flattened} inputs, not a square RoI of {embed_dim} channels"
        )
    return dict(
        region_embed_dim=embed_dim,
        region_fusion_rounds=count(r"mlvl_fuse\.fuse_convs\.\d+\.conv\.weight$"),
        roi_output_size=roi_size,
        region_hidden_size=hidden,
        region_position_hidden=shape("roi_align.pos_embedd.0.weight")[0],
    )


# tokenizer ------------------------------------------------------------------------------------------------
def _delta_tokenizer(delta_dir: Path, config: RegionLLMConfig) -> PreTrainedTokenizerBase:
    """LLaMA's tokenizer with GPT4RoI's six tokens, checked against added_tokens.json; ids go into `config`."""
    added = _read_json(delta_dir / "added_tokens.json", "--delta")
    absent = [token for token in SPECIAL_TOKENS if token not in added]
    if absent:
        raise CheckpointError(f"--delta added_tokens.json lacks {', '.join(absent)}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(delta_dir, local_files_only=True)
    except (OSError, ValueError) as error:
        raise CheckpointError(f"--delta {delta_dir}: cannot load the tokenizer: {error}") from error
    for token, token_id in added.items():
        if tokenizer.convert_tokens_to_ids(token) != token_id:
            raise CheckpointError(
                f"--delta tokenizer gives {token} the id {tokenizer.convert_tokens_to_ids(token)}, "
                f"added_tokens.json says {token_id}"
            )
    vocab_size = config.text_config.vocab_size
    if len(tokenizer) > vocab_size:
        raise CheckpointError(
            f"--delta tokenizer has {len(tokenizer)} tokens for {vocab_size} embedding rows"
        )
    probe = tokenizer.convert_ids_to_tokens(tokenizer("x", add_special_tokens=False)["input_ids"])
    if not probe or not probe[0].startswith("▁"):
        # the processor encodes the text between added tokens piece by piece, each with SentencePiece's prefix
        raise CheckpointError(
            f"--delta tokenizer encodes 'x' as {probe}: it does not prefix a piece with '▁' as LLaMA's SentencePiece does"
        )
    if PAD_TOKEN in added:
        tokenizer.pad_token = PAD_TOKEN
    add_special_tokens(tokenizer, config)  # all present: this records their ids in the config
    text = config.text_config
    text.pad_token_id, text.bos_token_id, text.eos_token_id = (
        tokenizer.pad_token_id,
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
    )
    return tokenizer


# tensors --------------------------------------------------------------------------------------------------
def _delta_tensors(
    delta: CheckpointReader, base: CheckpointReader, dtype: torch.dtype
) -> tuple[list[PlannedTensor], list[str]]:
    """Every delta tensor, renamed, with the base added where the delta is relative to it."""
    planned, dropped = [], []
    for name in delta.names():
        if ROTARY_BUFFER.match(name):
            dropped.append(name)
            continue
        target = our_name(name)
        if target is None:
            raise CheckpointError(f"--delta has a tensor this converter does not know: {name!r}")
        shape = delta.shape(name)
        origin = f"--delta {name}"
        if name.startswith(ABSOLUTE_PREFIXES):
            load = partial(delta.tensor, name, dtype)
        else:
            _check_base_shape(name, shape, base)
            load = partial(_merged, delta, base, name, dtype)
        planned.append(PlannedTensor(name=target, shape=shape, dtype=dtype, load=load, origin=origin))
    return planned, dropped


def _check_base_shape(name: str, shape: tuple[int, ...], base: CheckpointReader) -> None:
    if name not in base:
        raise CheckpointError(
            f"--base has no {name!r}, which the delta is relative to; --base must be LLaMA-1 7B in Hugging Face format"
        )
    base_shape = base.shape(name)
    grown_rows = (
        name in GROWN_VOCABULARY
        and len(shape) == 2
        and len(base_shape) == 2
        and base_shape[1] == shape[1]
        and base_shape[0] <= shape[0]
    )
    if base_shape != shape and not grown_rows:
        raise CheckpointError(
            f"shape mismatch for {name}: --delta has {list(shape)}, --base has {list(base_shape)}"
        )


def _merged(delta: CheckpointReader, base: CheckpointReader, name: str, dtype: torch.dtype) -> torch.Tensor:
    # In float32, whatever the files hold; only the rows the base has (the added tokens are absolute).
    merged = delta.tensor(name).to(torch.float32, copy=True)
    base_tensor = base.tensor(name)
    merged[: base_tensor.shape[0]] += base_tensor.to(torch.float32)
    return merged.to(dtype)
