"""Tiny checkpoints in the exact on-disk layouts of real ones, for the conversion tests.

- a CLIP directory like openai/clip-vit-large-patch14 (a whole CLIPModel, preprocessor config);
- a LLaMA-style byte-fallback tokenizer;
- GPT4RoI-7B-delta-V0's layout: a LLaVA config.json, two pickled shards with an index, LLaMA
  tensors stored as target - base (absolute rows for the six added tokens), mm_projector and
  spi_module absolute, rotary inv_freq buffers; its tokenizer as transformers 4.29 saved it
  (a SentencePiece tokenizer.model trained here like LLaMA's, the tokenizer.json the 4.29 fast
  converter makes of it, added_tokens.json); and the LLaMA-1 base it is a delta over, as a Hugging
  Face directory (pickled or safetensors shards).
"""

from __future__ import annotations

import io
import json
import string
from dataclasses import dataclass
from pathlib import Path

import sentencepiece
import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
from tokenizers.models import BPE
from transformers import CLIPConfig, CLIPModel, LlamaConfig, LlamaTokenizer
from transformers.tokenization_utils_base import generate_merges

from roi_model.configuration import CLIP_MEAN, CLIP_STD

# GPT4RoI's added tokens, in the order its training code added them.
ADDED_TOKENS = ["[PAD]", "<im_patch>", "<bbox>", "<point>", "<im_start>", "<im_end>"]

CLIP_WIDTH = 64  # also the region encoder's width, as in GPT4RoI (1024 there)
CLIP_LAYERS = 12  # hidden states -11 .. -2 exist
LLM_WIDTH = 32
LLM_LAYERS = 2
REGION_HIDDEN = 48  # flatten_linear's output (1024 in GPT4RoI); distinct widths catch transposed weights
POSITION_HIDDEN = 24
ROI = 14
ROUNDS = 5
LEVELS = 4


def write_clip(
    directory: Path, *, image_size: int = 224, layers: int = CLIP_LAYERS, seed: int = 0
) -> CLIPModel:
    """A whole CLIPModel (text half included) saved by save_pretrained, plus a preprocessor config."""
    torch.manual_seed(seed)
    config = CLIPConfig(
        vision_config=dict(
            hidden_size=CLIP_WIDTH,
            intermediate_size=2 * CLIP_WIDTH,
            num_hidden_layers=layers,
            num_attention_heads=4,
            image_size=image_size,
            patch_size=14,
        ),
        text_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            vocab_size=99,
            bos_token_id=0,
            eos_token_id=1,
        ),
        projection_dim=16,
    )
    model = CLIPModel(config).eval()
    model.save_pretrained(directory)
    (directory / "preprocessor_config.json").write_text(
        json.dumps(
            {"image_processor_type": "CLIPImageProcessor", "image_mean": CLIP_MEAN, "image_std": CLIP_STD}
        )
    )
    return model


def llama_tokenizer() -> LlamaTokenizer:
    """LLaMA's kind of tokenizer (BPE with byte fallback, <unk> <s> </s> first), character-level to stay small."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    for character in "▁" + string.ascii_letters + string.digits + ".,:?#'<>":
        vocab.setdefault(character, len(vocab))
    return LlamaTokenizer(vocab=vocab, merges=[], add_bos_token=True)


# What the SentencePiece model learns from: GPT4RoI's system prompt, templates and answers.
SENTENCEPIECE_TEXTS = [
    "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the human's questions.",
    "### Human: The image provides an overview of the picture.",
    "Can you give a description of the region mentioned by region1? What is region2 doing?",
    "### Assistant: A man in a red shirt is riding a bicycle down the street, next to region3.",
    "Is the woman left of the dog? Which is larger, region1 or region2? Describe it briefly.",
    "There are 12 people; 3.5 metres away, a child holds an umbrella!",
]


def sentencepiece_model(vocab_size: int = 320) -> bytes:
    """A SentencePiece model trained as LLaMA's was (BPE, byte fallback, a dummy prefix, whitespace kept,
    digits split, <unk> <s> </s> as ids 0 1 2)."""
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(SENTENCEPIECE_TEXTS * 8),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        split_digits=True,
        allow_whitespace_only_pieces=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    return model.getvalue()


def write_gpt4roi_tokenizer(directory: Path, model: bytes) -> dict[str, int]:
    """The tokenizer files of GPT4RoI's release, as transformers 4.29 wrote them; returns the added tokens' ids.

    tokenizer.json is what 4.29's LlamaConverter makes of the SentencePiece model: BPE over its pieces
    with byte fallback, a "▁"-prepending normalizer, a BOS-adding post-processor.
    """
    (directory / "tokenizer.model").write_bytes(model)
    processor = sentencepiece.SentencePieceProcessor(model_proto=model)
    vocab = {processor.id_to_piece(index): index for index in range(processor.get_piece_size())}
    fast = Tokenizer(BPE(vocab, generate_merges(vocab), unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    fast.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    fast.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    fast.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    fast.add_special_tokens([AddedToken(token, normalized=True) for token in ("<unk>", "<s>", "</s>")])
    fast.add_special_tokens(ADDED_TOKENS)
    fast.save(str(directory / "tokenizer.json"))
    token_ids = {token: len(vocab) + index for index, token in enumerate(ADDED_TOKENS)}
    (directory / "added_tokens.json").write_text(json.dumps(token_ids, indent=2) + "\n")
    (directory / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "LlamaTokenizer",
                "add_bos_token": True,
                "add_eos_token": False,
                "bos_token": {"__type": "AddedToken", "content": "<s>", "lstrip": False, "rstrip": False},
                "eos_token": {"__type": "AddedToken", "content": "</s>", "lstrip": False, "rstrip": False},
                "unk_token": {"__type": "AddedToken", "content": "<unk>", "lstrip": False, "rstrip": False},
                "pad_token": None,
                "model_max_length": 2048,
                "padding_side": "right",
                "clean_up_tokenization_spaces": False,
            },
            indent=2,
        )
    )
    (directory / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "[PAD]", "unk_token": "<unk>"})
    )
    return token_ids


def llama_config(vocab_size: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=LLM_WIDTH,
        intermediate_size=80,
        num_hidden_layers=LLM_LAYERS,
        num_attention_heads=4,
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )


def llama_shapes(vocab_size: int) -> dict[str, tuple[int, ...]]:
    """LLaMA's tensors under GPT4RoI's (= Hugging Face LlamaForCausalLM's) names."""
    inner = 80
    shapes = {"model.embed_tokens.weight": (vocab_size, LLM_WIDTH)}
    for layer in range(LLM_LAYERS):
        prefix = f"model.layers.{layer}."
        for projection in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[prefix + f"self_attn.{projection}.weight"] = (LLM_WIDTH, LLM_WIDTH)
        shapes[prefix + "mlp.gate_proj.weight"] = (inner, LLM_WIDTH)
        shapes[prefix + "mlp.up_proj.weight"] = (inner, LLM_WIDTH)
        shapes[prefix + "mlp.down_proj.weight"] = (LLM_WIDTH, inner)
        shapes[prefix + "input_layernorm.weight"] = (LLM_WIDTH,)
        shapes[prefix + "post_attention_layernorm.weight"] = (LLM_WIDTH,)
    shapes["model.norm.weight"] = (LLM_WIDTH,)
    shapes["lm_head.weight"] = (vocab_size, LLM_WIDTH)
    return shapes


def spi_shapes() -> dict[str, tuple[int, ...]]:
    """The non-LLaMA tensors of GPT4RoI's checkpoint, by its names (region-llms.md §A.3)."""
    width = CLIP_WIDTH
    shapes = {"model.mm_projector.weight": (LLM_WIDTH, CLIP_WIDTH), "model.mm_projector.bias": (LLM_WIDTH,)}
    spi = "model.spi_module."
    for level in range(LEVELS):
        shapes[spi + f"mlvl_fuse.input_conv.{level}.weight"] = (width, CLIP_WIDTH + 2, 1, 1)
        shapes[spi + f"mlvl_fuse.input_conv.{level}.bias"] = (width,)
    for round_ in range(ROUNDS):
        shapes[spi + f"mlvl_fuse.fuse_convs.{round_}.conv.weight"] = (width, width, 3, 3)
        shapes[spi + f"mlvl_fuse.fuse_convs.{round_}.gn.weight"] = (width,)
        shapes[spi + f"mlvl_fuse.fuse_convs.{round_}.gn.bias"] = (width,)
    for level in range(LEVELS):
        shapes[spi + f"roi_align.pconvs.{level}.weight"] = (width, width, 3, 3)
        shapes[spi + f"roi_align.pconvs.{level}.bias"] = (width,)
    shapes[spi + "roi_align.pos_embedd.0.weight"] = (POSITION_HIDDEN, 4)
    shapes[spi + "roi_align.pos_embedd.0.bias"] = (POSITION_HIDDEN,)
    shapes[spi + "roi_align.pos_embedd.2.weight"] = (POSITION_HIDDEN,)
    shapes[spi + "roi_align.pos_embedd.2.bias"] = (POSITION_HIDDEN,)
    shapes[spi + "roi_align.pos_embedd.3.weight"] = (REGION_HIDDEN, POSITION_HIDDEN)
    shapes[spi + "roi_align.pos_embedd.3.bias"] = (REGION_HIDDEN,)
    shapes[spi + "roi_align.pos_embedd.5.weight"] = (REGION_HIDDEN,)
    shapes[spi + "roi_align.pos_embedd.5.bias"] = (REGION_HIDDEN,)
    shapes[spi + "roi_align.flatten_linear.weight"] = (REGION_HIDDEN, width * ROI * ROI)
    shapes[spi + "roi_align.flatten_linear.bias"] = (REGION_HIDDEN,)
    shapes[spi + "roi_align.updims.weight"] = (LLM_WIDTH, REGION_HIDDEN)
    shapes[spi + "roi_align.updims.bias"] = (LLM_WIDTH,)
    return shapes


def _random(shape: tuple[int, ...], name: str, generator: torch.Generator) -> torch.Tensor:
    """Distinct random values everywhere (norm scales around 1), so any swapped tensor shows."""
    if len(shape) == 1 and (
        "norm" in name or ".gn." in name or name.endswith(("pos_embedd.2.weight", "pos_embedd.5.weight"))
    ):
        return 1 + 0.2 * torch.randn(shape, generator=generator)
    fan_in = max(1, int(torch.Size(shape[1:]).numel()))
    return torch.randn(shape, generator=generator) / fan_in**0.5


@dataclass
class Gpt4RoIRelease:
    delta: Path
    base: Path
    clip: Path
    clip_model: CLIPModel
    merged: dict[str, torch.Tensor]  # what apply_delta.py would produce, in float32, by GPT4RoI's names
    token_ids: dict[str, int]
    base_vocab: int
    sentencepiece: bytes  # the release's tokenizer.model


def _save_shards(directory: Path, shards: list[dict[str, torch.Tensor]], fmt: str) -> None:
    """Hugging Face sharded layout: numbered files and an index, pickled (.bin) or safetensors."""
    weight_map = {}
    for number, shard in enumerate(shards, start=1):
        if fmt == "bin":
            name = f"pytorch_model-{number:05d}-of-{len(shards):05d}.bin"
            torch.save(shard, directory / name)
        else:
            name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, directory / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    index = "pytorch_model.bin.index.json" if fmt == "bin" else "model.safetensors.index.json"
    (directory / index).write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))


def _rotary_buffers() -> dict[str, torch.Tensor]:
    # transformers 4.29 saved each layer's RoPE inverse frequencies with the weights
    head_dim = LLM_WIDTH // 4
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    return {f"model.layers.{layer}.self_attn.rotary_emb.inv_freq": inv_freq for layer in range(LLM_LAYERS)}


def write_gpt4roi_release(root: Path, *, base_format: str = "bin", seed: int = 0) -> Gpt4RoIRelease:
    """Delta, LLaMA base and CLIP directories under `root`, and the merged weights they stand for."""
    generator = torch.Generator().manual_seed(seed)
    spm_model = sentencepiece_model()
    base_vocab = sentencepiece.SentencePieceProcessor(model_proto=spm_model).get_piece_size()
    vocab = base_vocab + len(ADDED_TOKENS)

    base = {
        name: (0.5 * _random(shape, name, generator)).half()
        for name, shape in llama_shapes(base_vocab).items()
    }
    target = {name: _random(shape, name, generator) for name, shape in llama_shapes(vocab).items()}
    delta, merged = {}, {}
    for name, value in target.items():
        rows = base[name].shape[0]
        stored = value.clone()
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            stored[:rows] -= base[name].float()  # the added tokens' rows stay absolute
        else:
            stored -= base[name].float()
        delta[name] = stored.half()
        merged_value = delta[name].float()
        merged_value[:rows] += base[name].float()
        merged[name] = merged_value
    for name, shape in spi_shapes().items():
        value = _random(shape, name, generator)
        # fp16 like the release, with some float32 storages as it has too
        delta[name] = value if "pos_embedd" in name else value.half()
        merged[name] = delta[name].float()

    delta_dir, base_dir, clip_dir = (
        root / "GPT4RoI-7B-delta-V0",
        root / "llama-7b-hf",
        root / "clip-vit-large-patch14",
    )
    for directory in (delta_dir, base_dir, clip_dir):
        directory.mkdir(parents=True)

    llama_names = list(llama_shapes(vocab))
    first = [name for name in llama_names if name.startswith(("model.embed_tokens", "model.layers.0."))]
    rotary = _rotary_buffers()
    shard_one = {name: delta[name] for name in first} | {
        name: torch.zeros_like(value) for name, value in rotary.items() if ".0." in name
    }
    shard_two = {name: value for name, value in delta.items() if name not in shard_one} | {
        name: torch.zeros_like(value) for name, value in rotary.items() if ".0." not in name
    }
    _save_shards(delta_dir, [shard_one, shard_two], "bin")
    llava_config = {
        "_name_or_path": "GPT4RoI-7B-delta-V0",
        "architectures": ["SPILlavaMPTForCausalLM"],
        "model_type": "llava",
        **{
            key: value
            for key, value in llama_config(vocab).to_dict().items()
            if key
            in (
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "num_attention_heads",
                "max_position_embeddings",
                "rms_norm_eps",
                "hidden_act",
                "initializer_range",
            )
        },
        "vocab_size": vocab,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "tie_word_embeddings": False,
        "mm_hidden_size": CLIP_WIDTH,
        "mm_use_im_start_end": True,
        "mm_vision_select_layer": -2,
        "mm_vision_tower": "openai/clip-vit-large-patch14",
        "use_mm_proj": True,
        "sep_image_conv_front": False,
        "tune_mm_mlp_adapter": False,
        "freeze_mm_mlp_adapter": False,
        "torch_dtype": "float16",
        "transformers_version": "4.29.2",
        "use_cache": True,
    }
    (delta_dir / "config.json").write_text(json.dumps(llava_config, indent=2))
    (delta_dir / "generation_config.json").write_text(
        json.dumps(
            {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "transformers_version": "4.29.2"}
        )
    )

    token_ids = write_gpt4roi_tokenizer(delta_dir, spm_model)

    base_names = list(base)
    half = len(base_names) // 2
    base_shards = [
        {name: base[name] for name in base_names[:half]},
        {name: base[name] for name in base_names[half:]},
    ]
    if base_format == "bin":
        base_shards[0] |= {name: value for name, value in rotary.items() if ".0." in name}
        base_shards[1] |= {name: value for name, value in rotary.items() if ".0." not in name}
    _save_shards(base_dir, base_shards, base_format)
    llama_config(base_vocab).save_pretrained(base_dir)

    clip_model = write_clip(clip_dir, seed=seed)
    return Gpt4RoIRelease(delta_dir, base_dir, clip_dir, clip_model, merged, token_ids, base_vocab, spm_model)
