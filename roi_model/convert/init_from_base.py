"""A new region-LLM from any local CLIP/SigLIP vision model and any local causal LM.

The vision tower and the language model keep their pretrained weights; the image projector and
the region encoder start fresh (the model's own initialisation), ready for the training stages.
The image and box tokens are added to the LM's tokenizer; their embedding rows (input and output)
start at the mean of the pretrained rows, as LLaVA and GPT4RoI did. The prompt template is the
tokenizer's chat template when it has one, GPT4RoI's "###" conversation otherwise.

Like the GPT4RoI converter it streams tensor by tensor, so a 7B base needs little more memory
than its largest tensor and the fresh region encoder.
"""

from __future__ import annotations

import logging
import re
from functools import partial
from pathlib import Path

import torch
from transformers import AutoConfig, AutoTokenizer, GenerationConfig, PreTrainedTokenizerBase

from ..assembly import add_special_tokens, default_generation_config
from ..configuration import SPECIAL_TOKENS, RegionLLMConfig
from ..modeling import RegionLLMForCausalLM
from .checkpoint_files import CheckpointError, CheckpointReader, PlannedTensor
from .model_directory import DEFAULT_MAX_SHARD_BYTES, meta_model, parameter_counts, write_model_directory
from .vision_source import VisionSource

logger = logging.getLogger(__name__)

LM_PREFIX = "language_model."
FRESH_PARTS = ("mm_projector", "region_encoder")
NON_WEIGHTS = re.compile(r"\.rotary_emb\.inv_freq$")  # saved by older transformers, rebuilt from the config
LEVELS = 4
LEVEL_STEP = 3  # GPT4RoI's spacing of region layers; shallower towers get a smaller one
# Config fields `init` may be given; the rest follow from the vision model and the LM.
OVERRIDABLE = (
    "vision_feature_layer",
    "region_feature_layers",
    "region_pyramid_scales",
    "freeze_vision_tower",
    "region_embed_dim",
    "region_fusion_rounds",
    "region_norm_groups",
    "roi_output_size",
    "roi_sampling_ratio",
    "region_hidden_size",
    "region_position_hidden",
    "use_region_position",
    "projector_type",
    "template",
    "system_prompt",
    "image_prompt",
    "stop_strings",
)
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def region_layers_for(num_layers: int) -> list[int]:
    """Four hidden states ending at the penultimate one: GPT4RoI's -11, -8, -5, -2 when the tower is deep enough."""
    step = min(LEVEL_STEP, (num_layers - 1) // (LEVELS - 1))
    if step < 1:
        raise CheckpointError(
            f"the vision model has {num_layers} layers; a region encoder needs at least {LEVELS}"
        )
    return [-2 - step * index for index in reversed(range(LEVELS))]


def init_from_base(
    vision: str | Path,
    llm: str | Path,
    out: str | Path,
    *,
    dtype: torch.dtype | str | None = None,
    overrides: dict | None = None,
    seed: int = 0,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> dict:
    """Write a new region-LLM model directory to `out`.

    `dtype` defaults to the LM's own; `overrides` sets config fields listed in OVERRIDABLE (region
    encoder sizes, template, ...). Returns a summary with parameter counts.
    """
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(OVERRIDABLE))
    if unknown:
        raise ValueError(f"cannot set {', '.join(unknown)}; settable fields: {', '.join(OVERRIDABLE)}")
    vision_source = VisionSource.open(vision, "--vision")
    llm_dir = Path(llm)
    llm_reader = CheckpointReader(llm_dir, "--llm")
    try:
        text_config = AutoConfig.from_pretrained(llm_dir, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(llm_dir, local_files_only=True)
    except (OSError, ValueError, KeyError) as error:
        raise CheckpointError(f"--llm {llm_dir}: {error}") from error
    dtype = _output_dtype(dtype, text_config)

    pretrained_tokens = len(tokenizer)
    known = set(tokenizer.get_vocab())
    config = _region_config(vision_source, text_config, tokenizer, overrides)
    add_special_tokens(tokenizer, config)
    new_ids = [tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS if token not in known]
    rows = text_config.vocab_size
    if pretrained_tokens > rows:
        raise CheckpointError(
            f"--llm tokenizer has {pretrained_tokens} tokens but the model only {rows} embedding rows"
        )
    text = config.text_config
    text.vocab_size = max(rows, len(tokenizer))
    text.pad_token_id, text.bos_token_id, text.eos_token_id = (
        tokenizer.pad_token_id,
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
    )
    config.dtype = dtype

    model = meta_model(config)
    tensors = vision_source.planned_tensors(dtype)
    tensors += _language_model_tensors(model, llm_reader, dtype, pretrained_tokens, new_ids)
    tensors += _fresh_tensors(model, dtype, seed)
    written = write_model_directory(
        out,
        config=config,
        tokenizer=tokenizer,
        generation_config=_generation_config(config, tokenizer, llm_dir),
        tensors=tensors,
        max_shard_bytes=max_shard_bytes,
    )
    return {
        "out": str(out),
        "dtype": str(dtype).removeprefix("torch."),
        "template": config.template,
        "vision": vision_source.config.model_type,
        "llm": text.model_type,
        "added_tokens": {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS},
        "parameters": parameter_counts(tensors),
        "files": written.files,
        "bytes": written.total_bytes,
    }


def _output_dtype(dtype: torch.dtype | str | None, text_config) -> torch.dtype:
    if dtype is None:
        dtype = getattr(text_config, "dtype", None) or torch.float32
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; use {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    return dtype


def _region_config(
    vision: VisionSource, text_config, tokenizer: PreTrainedTokenizerBase, overrides: dict
) -> RegionLLMConfig:
    template = overrides.pop("template", "chat" if tokenizer.chat_template else "gpt4roi_v0")
    if template == "chat" and not tokenizer.chat_template:
        raise ValueError("template 'chat' needs a tokenizer with a chat template; the one of --llm has none")
    fields = dict(
        image_size=vision.config.image_size,
        image_mean=vision.image_mean,
        image_std=vision.image_std,
        vision_feature_layer=-2,
        region_feature_layers=region_layers_for(vision.config.num_hidden_layers),
        template=template,
        stop_strings=["###"] if template == "gpt4roi_v0" else [],
    )
    if template == "chat" and not _accepts_system_prompt(tokenizer):
        fields["system_prompt"] = ""
        logger.info("the chat template of --llm takes no system message; the system prompt is left out")
    fields.update(overrides)
    return RegionLLMConfig(vision_config=vision.config.to_dict(), text_config=text_config.to_dict(), **fields)


def _accepts_system_prompt(tokenizer: PreTrainedTokenizerBase) -> bool:
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    try:
        tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception:  # templates reject a system role by raising whatever their author chose
        return False
    return True


def _generation_config(
    config: RegionLLMConfig, tokenizer: PreTrainedTokenizerBase, llm_dir: Path
) -> GenerationConfig:
    """Our defaults, with the LM's own end-of-turn ids where it lists them (chat models often stop on several)."""
    generation = default_generation_config(config, tokenizer)
    if (llm_dir / "generation_config.json").exists():
        own = GenerationConfig.from_pretrained(llm_dir, local_files_only=True)
        if own.eos_token_id is not None:
            generation.eos_token_id = own.eos_token_id
    return generation


def _language_model_tensors(
    model: RegionLLMForCausalLM,
    reader: CheckpointReader,
    dtype: torch.dtype,
    pretrained_tokens: int,
    new_ids: list[int],
) -> list[PlannedTensor]:
    """The LM's tensors under `language_model.`; embedding matrices grown to the new vocabulary."""
    language_model = model.language_model
    module_names = {module: name for name, module in language_model.named_modules()}
    embedding_modules = [language_model.get_input_embeddings(), language_model.get_output_embeddings()]
    embedding_names = {f"{module_names[module]}.weight" for module in embedding_modules if module is not None}
    tied = set(language_model.all_tied_weights_keys)
    rows = model.config.text_config.vocab_size
    planned = []
    for name in reader.names():
        if NON_WEIGHTS.search(name) or name in tied:
            continue
        shape = reader.shape(name)
        if name in embedding_names:
            shape = (rows, *shape[1:])
            load = partial(_grown_embedding, reader, name, dtype, rows, pretrained_tokens, new_ids)
        else:
            load = partial(reader.tensor, name, dtype)
        planned.append(
            PlannedTensor(name=LM_PREFIX + name, shape=shape, dtype=dtype, load=load, origin=f"--llm {name}")
        )
    return planned


def _grown_embedding(
    reader: CheckpointReader,
    name: str,
    dtype: torch.dtype,
    rows: int,
    pretrained_tokens: int,
    new_ids: list[int],
) -> torch.Tensor:
    """`rows` rows: the pretrained ones, and the mean of the real tokens' rows for every new token
    (and for any row beyond the checkpoint's)."""
    pretrained = reader.tensor(name)
    mean = pretrained[:pretrained_tokens].to(torch.float32).mean(dim=0)
    grown = mean.expand(rows, -1).clone()
    grown[: pretrained.shape[0]] = pretrained.to(torch.float32)
    grown[new_ids] = mean
    return grown.to(dtype)


def _fresh_tensors(model: RegionLLMForCausalLM, dtype: torch.dtype, seed: int) -> list[PlannedTensor]:
    """The image projector and region encoder, initialised as a freshly built model initialises them."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        planned = []
        for part in FRESH_PARTS:
            module = getattr(model, part).to_empty(device="cpu")
            for submodule in module.modules():
                model._init_weights(submodule)
            for name, tensor in module.state_dict().items():
                planned.append(
                    PlannedTensor(
                        name=f"{part}.{name}",
                        shape=tuple(tensor.shape),
                        dtype=dtype,
                        load=partial(tensor.to, dtype),
                        origin=f"new {part}.{name}",
                    )
                )
        return planned
    finally:
        torch.random.set_rng_state(generator_state)
