"""Tiny random Qwen2.5-VL and Qwen3-VL region models, built from configs with a word-level tokenizer built
here: nothing is downloaded."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from roi_model.qwen_vl import QwenVLRegionModel

SPECIAL = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
WORDS = [
    "system", "user", "assistant", "You", "are", "a", "helpful", ".", "the", "region", "[", "]", ",",
    "Describe", "describe", "what", "is", "in", "and", "red", "circle", "blue", "square", "?", "left", "of", "yes", "no",
]  # fmt: skip
WORDS += [str(digit) for digit in range(10)]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {word: index for index, word in enumerate([*SPECIAL, *WORDS, "<unk>"])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Punctuation(),
            pre_tokenizers.Digits(individual_digits=True),
        ]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="<unk>",
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        additional_special_tokens=SPECIAL[1:],
    )


def _token_ids(tokenizer) -> dict:
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL}
    return {
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
    }


def tiny_qwen(family: str, *, min_pixels: int = 4 * 28 * 28, max_pixels: int = 16 * 28 * 28, seed: int = 0):
    """A QwenVLRegionModel of `family` ("qwen2_5_vl" or "qwen3_vl") with random weights."""
    tokenizer = tiny_tokenizer()
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    text = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        eos_token_id=eos,
        pad_token_id=0,
        bos_token_id=0,
    )
    torch.manual_seed(seed)
    if family == "qwen2_5_vl":
        from transformers import (
            Qwen2_5_VLConfig,
            Qwen2_5_VLForConditionalGeneration,
            Qwen2_5_VLProcessor,
            Qwen2VLImageProcessor,
            Qwen2VLVideoProcessor,
        )

        config = Qwen2_5_VLConfig(
            text_config={**text, "rope_scaling": {"type": "mrope", "mrope_section": [1, 1, 2]}},
            vision_config=dict(
                depth=2,
                hidden_size=32,
                intermediate_size=64,
                num_heads=2,
                out_hidden_size=32,
                patch_size=14,
                spatial_merge_size=2,
                temporal_patch_size=2,
                window_size=56,
                fullatt_block_indexes=[1],
            ),
            **_token_ids(tokenizer),
        )
        model = Qwen2_5_VLForConditionalGeneration(config)
        image_processor = Qwen2VLImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels)
        processor = Qwen2_5_VLProcessor(
            image_processor=image_processor, tokenizer=tokenizer, video_processor=Qwen2VLVideoProcessor()
        )
    else:
        from transformers import (
            Qwen2VLImageProcessor,
            Qwen3VLConfig,
            Qwen3VLForConditionalGeneration,
            Qwen3VLProcessor,
            Qwen3VLVideoProcessor,
        )

        config = Qwen3VLConfig(
            text_config={
                **text,
                "head_dim": 8,
                "rope_parameters": {
                    "rope_type": "default",
                    "rope_theta": 10000.0,
                    "mrope_section": [2, 1, 1],
                    "mrope_interleaved": True,
                },
            },
            vision_config=dict(
                depth=2,
                hidden_size=32,
                intermediate_size=64,
                num_heads=2,
                out_hidden_size=32,
                patch_size=16,
                spatial_merge_size=2,
                temporal_patch_size=2,
                num_position_embeddings=64,
                deepstack_visual_indexes=[1],
            ),
            **_token_ids(tokenizer),
        )
        model = Qwen3VLForConditionalGeneration(config)
        image_processor = Qwen2VLImageProcessor(
            patch_size=16, merge_size=2, min_pixels=min_pixels, max_pixels=max_pixels,
            image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
        )  # fmt: skip
        processor = Qwen3VLProcessor(
            image_processor=image_processor, tokenizer=tokenizer, video_processor=Qwen3VLVideoProcessor()
        )
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = 0
    return QwenVLRegionModel(model.eval(), processor, family)
