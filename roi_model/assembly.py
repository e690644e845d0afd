"""Putting a region-LLM together from a config and a tokenizer, and saving it.

A model directory is a Hugging Face layout that loads offline (roi_model.loading): config.json,
model.safetensors, the tokenizer files and generation_config.json.
"""

from __future__ import annotations

from pathlib import Path

from transformers import GenerationConfig, PreTrainedTokenizerBase

from roi_contract.describe import DEFAULT_MAX_NEW_TOKENS

from .configuration import SPECIAL_TOKENS, RegionLLMConfig
from .modeling import RegionLLMForCausalLM
from .processing import RegionProcessor


def add_special_tokens(tokenizer: PreTrainedTokenizerBase, config: RegionLLMConfig) -> int:
    """Add the image and box tokens the tokenizer lacks and record their ids in the config.

    Returns how many tokens were new (the embeddings must grow by that much).
    """
    added = tokenizer.add_tokens(
        [token for token in SPECIAL_TOKENS if token not in tokenizer.get_vocab()], special_tokens=True
    )
    ids = tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS))
    (
        config.image_patch_token_id,
        config.bbox_token_id,
        config.image_start_token_id,
        config.image_end_token_id,
    ) = ids
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return added


def build_model(
    config: RegionLLMConfig, tokenizer: PreTrainedTokenizerBase
) -> tuple[RegionLLMForCausalLM, RegionProcessor]:
    """A freshly initialised model whose vocabulary matches the tokenizer."""
    add_special_tokens(tokenizer, config)
    config.text_config.vocab_size = len(tokenizer)
    config.text_config.pad_token_id = tokenizer.pad_token_id
    config.text_config.bos_token_id = tokenizer.bos_token_id
    config.text_config.eos_token_id = tokenizer.eos_token_id
    model = RegionLLMForCausalLM(config)
    model.generation_config = default_generation_config(config, tokenizer)
    return model, RegionProcessor(tokenizer, config, model.num_image_tokens)


def default_generation_config(
    config: RegionLLMConfig, tokenizer: PreTrainedTokenizerBase, **overrides
) -> GenerationConfig:
    """Greedy, 48 new tokens. The stop strings stay in config.stop_strings, which our generation paths apply
    with any tokenizer; `model.generate` callers pass them (stop_strings=..., tokenizer=...)."""
    settings = dict(max_new_tokens=DEFAULT_MAX_NEW_TOKENS, do_sample=False) | overrides
    return GenerationConfig(
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        **settings,
    )


def save_pretrained(model: RegionLLMForCausalLM, processor: RegionProcessor, directory: str | Path) -> None:
    model.save_pretrained(directory)  # with its generation_config.json
    processor.save_pretrained(directory)
