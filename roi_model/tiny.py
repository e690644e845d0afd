"""Small models built from config alone: for tests, and for the demo model of the synthetic world.

The tokenizer is word-level, trained with `tokenizers` on the words the model must know, and
saved in the model directory like any other tokenizer. Its chat template is three markers long,
so that a tiny model spends its few positions on the image and the question.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import (
    CLIPVisionConfig,
    ConvNextConfig,
    LlamaConfig,
    PreTrainedTokenizerFast,
    SiglipVisionConfig,
)

from .configuration import SPECIAL_TOKENS, RegionLLMConfig

PAD, UNK, BOS, EOS, USER, ASSISTANT = "<pad>", "<unk>", "<s>", "</s>", "<user>", "<assistant>"

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}<user> {{ message['content'] }} "
    "{% elif message['role'] == 'assistant' %}<assistant> {{ message['content'] }} </s> {% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<assistant> {% endif %}"
)

# Words every tiny model knows besides its training texts: the image prompt and region names.
BASE_WORDS = [
    "the",
    "provides",
    "an",
    "overview",
    "of",
    "picture",
    ".",
    ",",
    "?",
    ":",
    "region",
    "yes",
    "no",
] + [f"region{k}" for k in range(1, 17)]


def train_word_tokenizer(texts: Iterable[str]) -> PreTrainedTokenizerFast:
    """A lower-case word-level tokenizer whose vocabulary is every word of `texts` plus BASE_WORDS."""
    tokenizer = Tokenizer(models.WordLevel(unk_token=UNK))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    trainer = trainers.WordLevelTrainer(special_tokens=[PAD, UNK, BOS, EOS, USER, ASSISTANT, *SPECIAL_TOKENS])
    tokenizer.train_from_iterator([*texts, " ".join(BASE_WORDS)], trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=PAD,
        unk_token=UNK,
        bos_token=BOS,
        eos_token=EOS,
        additional_special_tokens=[USER, ASSISTANT, *SPECIAL_TOKENS],
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def tiny_vision_config(kind: str) -> tuple[object, dict]:
    """A vision config and the region-encoder fields that fit it."""
    if kind == "convnext":
        # The tower of reference/synthetic-probe.md: stage maps of 28, 14, 7 and 3 at 112 px.
        vision = ConvNextConfig(
            num_channels=3, patch_size=4, hidden_sizes=[32, 64, 128, 128], depths=[1, 1, 2, 1], image_size=112
        )
        fields = dict(
            image_size=112,
            vision_feature_layer=4,  # the 3x3 stage: 9 global tokens (49 learn too, 1.7x slower: README ablation)
            region_feature_layers=[1, 2, 3],
            region_pyramid_scales=[1.0, 1.0, 1.0],
        )
        return vision, fields
    vit = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        image_size=64,
        patch_size=8,
    )
    vision = CLIPVisionConfig(**vit) if kind == "clip" else SiglipVisionConfig(**vit)
    fields = dict(
        image_size=64,
        vision_feature_layer=-2,
        region_feature_layers=[-4, -3, -2, -1],
        region_pyramid_scales=[4.0, 2.0, 1.0, 1.0],
    )
    return vision, fields


def tiny_config(
    kind: str = "convnext", *, text_width: int = 128, text_layers: int = 3, **overrides
) -> RegionLLMConfig:
    """A region-LLM of a few MB. `kind` picks the vision tower: convnext, clip or siglip."""
    if kind not in ("convnext", "clip", "siglip"):
        raise ValueError(f"unknown tiny vision tower {kind!r}: use convnext, clip or siglip")
    vision, vision_fields = tiny_vision_config(kind)
    text = LlamaConfig(
        hidden_size=text_width,
        intermediate_size=text_width * 2,
        num_hidden_layers=text_layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        vocab_size=64,
        tie_word_embeddings=False,
    )
    fields = dict(
        region_embed_dim=64,
        region_fusion_rounds=2,
        region_norm_groups=8,
        roi_output_size=7,
        region_hidden_size=128,
        region_position_hidden=64,
        template="chat",
        system_prompt="",
        stop_strings=[],
    )
    fields.update(vision_fields)
    fields.update(overrides)
    return RegionLLMConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), **fields)
