"""Time the fast engine against the plain path (issue 4) and print one JSON line.

The workload: 8 images x 8 regions, one caption question per region, 24 new tokens, greedy, on a
randomly initialised model of representative size: a CLIP ViT-B/16 vision tower, a ~150M-parameter
Llama-style LM and the GPT4RoI region encoder scaled down to the ViT-B width (see `benchmark_config`).
The prompt is GPT4RoI's: the gpt4roi_v0 template with its system prompt and 196 image tokens.

One run measures both paths on the same model and inputs:
- plain: `generate_answer` for each of the 64 questions (vision tower, full prefill, HF generate);
- engine: one `RegionEngine.answer` call over the 8 images, on a fresh engine (cold caches);
- interactive: a fresh engine answers one question on a new image (first box), then one question
  with a new box on that image (next box); medians over a few repetitions.

A random model would stop whenever it happens to pick the end-of-sequence token, so the benchmark
gives it an end-of-sequence id past the last logit (which no argmax can return) and no stop strings,
then checks that every answer of both paths has exactly `new_tokens` tokens and reports whether
the two paths agree token for token ("identical").

`--quick` runs a small model on 2 images x 2 regions, to check within a minute that the script works.
Progress goes to stderr; stdout carries only the JSON line.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm
from transformers import CLIPVisionConfig, LlamaConfig

from roi_model.assembly import build_model
from roi_model.configuration import GPT4ROI_SYSTEM_PROMPT, IMAGE_PROMPT, RegionLLMConfig
from roi_model.engine import ImageRequest, RegionEngine, RegionQuery
from roi_model.generation import Answer, GenerationOptions, generate_answer
from roi_model.modeling import RegionLLMForCausalLM
from roi_model.processing import RegionProcessor
from roi_model.word_tokenizer import train_word_tokenizer

logger = logging.getLogger("benchmarks.engine")

TEMPLATE_WORDS = "### Human: ### Assistant:"  # the gpt4roi_v0 turn markers
# GPT4RoI's own caption instruction; every word of it is in the benchmark vocabulary.
CAPTION_QUESTION = (
    "Can you provide me with a brief description of the region in the picture marked by <region1>?"
)


@dataclass(frozen=True)
class Scale:
    """Model and workload sizes of one benchmark run."""

    vision_width: int
    vision_layers: int
    vision_heads: int
    vision_mlp: int
    image_size: int
    patch_size: int
    text_width: int
    text_layers: int
    text_heads: int
    text_intermediate: int
    vocab_size: int
    region_embed_dim: int
    region_fusion_rounds: int
    region_norm_groups: int
    roi_output_size: int
    region_hidden_size: int
    images: int
    regions_per_image: int
    new_tokens: int
    interactive_repeats: int


FULL = Scale(
    # CLIP ViT-B/16 at 224 px: 14 x 14 = 196 image tokens.
    vision_width=768,
    vision_layers=12,
    vision_heads=12,
    vision_mlp=3072,
    image_size=224,
    patch_size=16,
    # A Llama of ~148M parameters (49M of them the untied input and output embeddings).
    text_width=768,
    text_layers=12,
    text_heads=12,
    text_intermediate=2560,
    vocab_size=32000,
    # GPT4RoI's region encoder is 1024 wide with 5 fusion rounds and 14 x 14 RoIAlign on a
    # 128/64/32/16 pyramid of ViT-L/14: ~2.1 TFLOP per image (13x its vision tower) and ~15 GFLOP per
    # box, which would keep the plain path on this 2-core CPU busy for well over half an hour. Same
    # design (4 levels upsampled 8/4/2/1 to 112/56/28/14, coord channels, scale shuffle, per-level 3x3
    # convs, flatten-linear, position MLP), narrower: 256 wide, 2 rounds, 7 x 7 RoIAlign -> 46 GFLOP
    # per image (1.4x the ViT-B tower) and 0.25 GFLOP per box.
    region_embed_dim=256,
    region_fusion_rounds=2,
    region_norm_groups=32,
    roi_output_size=7,
    region_hidden_size=768,
    images=8,
    regions_per_image=8,
    new_tokens=24,
    interactive_repeats=3,
)

QUICK = Scale(
    vision_width=64,
    vision_layers=4,
    vision_heads=4,
    vision_mlp=128,
    image_size=64,
    patch_size=16,
    text_width=64,
    text_layers=2,
    text_heads=4,
    text_intermediate=128,
    vocab_size=1000,
    region_embed_dim=32,
    region_fusion_rounds=1,
    region_norm_groups=8,
    roi_output_size=7,
    region_hidden_size=64,
    images=2,
    regions_per_image=2,
    new_tokens=8,
    interactive_repeats=2,
)


# the model ------------------------------------------------------------------------------------------
def benchmark_config(scale: Scale) -> RegionLLMConfig:
    vision = CLIPVisionConfig(
        hidden_size=scale.vision_width,
        intermediate_size=scale.vision_mlp,
        num_hidden_layers=scale.vision_layers,
        num_attention_heads=scale.vision_heads,
        image_size=scale.image_size,
        patch_size=scale.patch_size,
    )
    text = LlamaConfig(
        hidden_size=scale.text_width,
        intermediate_size=scale.text_intermediate,
        num_hidden_layers=scale.text_layers,
        num_attention_heads=scale.text_heads,
        num_key_value_heads=scale.text_heads,
        max_position_embeddings=2048,
        vocab_size=scale.vocab_size,
        tie_word_embeddings=False,
    )
    layers = scale.vision_layers
    return RegionLLMConfig(
        vision_config=vision.to_dict(),
        text_config=text.to_dict(),
        image_size=scale.image_size,
        # GPT4RoI's layers (-11, -8, -5, -2 of ViT-L's 24) scaled to this depth; ViT-B keeps them as is.
        region_feature_layers=[
            -round(layers * 11 / 12),
            -round(layers * 8 / 12),
            -round(layers * 5 / 12),
            -2,
        ],
        region_embed_dim=scale.region_embed_dim,
        region_fusion_rounds=scale.region_fusion_rounds,
        region_norm_groups=scale.region_norm_groups,
        roi_output_size=scale.roi_output_size,
        region_hidden_size=scale.region_hidden_size,
        template="gpt4roi_v0",
        stop_strings=[],
    )


def benchmark_tokenizer(vocab_size: int):
    """A word-level tokenizer that spells the whole prompt, padded with filler words to vocab_size.

    (`train_word_tokenizer` keeps at most 30000 words, so the filler goes in as added tokens.)
    """
    tokenizer = train_word_tokenizer([GPT4ROI_SYSTEM_PROMPT, TEMPLATE_WORDS, IMAGE_PROMPT, CAPTION_QUESTION])
    if len(tokenizer) > vocab_size:
        raise ValueError(
            f"vocab_size {vocab_size} is smaller than the {len(tokenizer)} words the prompt needs"
        )
    tokenizer.add_tokens([f"filler{index}" for index in range(vocab_size - len(tokenizer))])
    return tokenizer


def build_benchmark_model(scale: Scale, device: torch.device) -> tuple[RegionLLMForCausalLM, RegionProcessor]:
    torch.manual_seed(0)
    model, processor = build_model(benchmark_config(scale), benchmark_tokenizer(scale.vocab_size))
    # An end-of-sequence id past the last logit: argmax never returns it, so every answer runs to the limit.
    unreachable = model.config.text_config.vocab_size
    model.generation_config.eos_token_id = unreachable
    model.language_model.generation_config.eos_token_id = unreachable
    return model.to(device).eval(), processor


def parameter_count(module: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


# the workload ---------------------------------------------------------------------------------------
def noise_image(seed: int, width: int = 640, height: int = 480) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def random_boxes(seed: int, count: int) -> list[list[float]]:
    """Boxes of 10-60% of the image side, anywhere inside it."""
    rng = np.random.default_rng(seed)
    boxes = []
    for _ in range(count):
        width, height = rng.uniform(0.1, 0.6, size=2)
        x1, y1 = rng.uniform(0, 1 - width), rng.uniform(0, 1 - height)
        boxes.append([round(x1, 4), round(y1, 4), round(x1 + width, 4), round(y1 + height, 4)])
    return boxes


def workload(scale: Scale, options: GenerationOptions) -> list[ImageRequest]:
    return [
        ImageRequest(
            noise_image(seed=image),
            [
                RegionQuery(CAPTION_QUESTION, [box])
                for box in random_boxes(1000 + image, scale.regions_per_image)
            ],
            options,
        )
        for image in range(scale.images)
    ]


# FLOPs ------------------------------------------------------------------------------------------------
def hidden_layers_needed(config: RegionLLMConfig) -> int:
    """Vision layers that must run: up to the deepest hidden state the model reads."""
    states = config.vision_config.num_hidden_layers + 1
    return max(index % states for index in [config.vision_feature_layer, *config.region_feature_layers])


def vision_flops(config: RegionLLMConfig) -> float:
    """Per image: patch embedding, the transformer layers that are needed, the image projector."""
    vision = config.vision_config
    patches = (config.image_size // vision.patch_size) ** 2
    tokens = patches + 1  # CLIP's class token
    width, mlp = vision.hidden_size, vision.intermediate_size
    per_layer = 2 * tokens * (4 * width * width + 2 * width * mlp) + 2 * 2 * tokens * tokens * width
    patch_embedding = 2 * patches * 3 * vision.patch_size**2 * width
    projector = 2 * patches * width * config.text_config.hidden_size
    return patch_embedding + hidden_layers_needed(config) * per_layer + projector


def region_fuse_flops(config: RegionLLMConfig) -> float:
    """Per image: the 1x1 input convs and the 3x3 convs of every fusion round, on every pyramid level."""
    grid = config.image_size // config.vision_config.patch_size
    pixels = [round(grid * scale) ** 2 for scale in config.region_pyramid_scales]
    width, channels = config.region_embed_dim, config.vision_config.hidden_size
    input_convs = sum(2 * (channels + 2) * width * count for count in pixels)
    rounds = config.region_fusion_rounds * sum(2 * 9 * width * width * count for count in pixels)
    return input_convs + rounds


def region_box_flops(config: RegionLLMConfig) -> float:
    """Per box: the per-level 3x3 convs on the RoIAlign output, flatten-linear, position MLP, projection."""
    width, size, hidden = config.region_embed_dim, config.roi_output_size, config.region_hidden_size
    levels = len(config.region_feature_layers)
    position = config.region_position_hidden
    return (
        levels * 2 * 9 * width * width * size * size
        + 2 * width * size * size * hidden
        + 2 * (4 * position + position * hidden)
        + 2 * hidden * config.text_config.hidden_size
    )


def llm_token_flops(config: RegionLLMConfig, context: int, logits: bool) -> float:
    """One token through the LM: 2 x the layers' matmul parameters, attention over `context` keys, and the
    output head when its logits are used."""
    text = config.text_config
    width, heads = text.hidden_size, text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or width // heads
    kv_width = text.num_key_value_heads * head_dim
    matmul_params = width * heads * head_dim * 2 + 2 * width * kv_width + 3 * width * text.intermediate_size
    attention = 2 * 2 * context * heads * head_dim
    head = 2 * width * text.vocab_size if logits else 0
    return text.num_hidden_layers * (2 * matmul_params + attention) + head


def workload_flops(
    config: RegionLLMConfig, images: int, prefix_length: int, suffix_lengths: list[int], new_tokens: int
) -> float:
    """The useful FLOPs of answering `len(suffix_lengths)` one-box questions about `images` images.

    Matmuls count 2 x multiply-adds (2 x parameters per token), attention 2 x 2 x keys x width per token
    and layer. Work a perfect engine cannot avoid, and nothing more:
        images x (vision tower + region fusion + LM prefill of the shared prefix, no logits)
      + per question: region pooling of its box + LM prefill of its suffix (logits of the last token)
                      + (new_tokens - 1) decode steps (the first new token comes from the prefill),
    each LM token attending to every earlier real token (padding excluded).
    """
    per_image = vision_flops(config) + region_fuse_flops(config)
    prefix = sum(llm_token_flops(config, position + 1, logits=False) for position in range(prefix_length))
    total = images * (per_image + prefix)
    for suffix in suffix_lengths:
        total += region_box_flops(config)
        total += sum(
            llm_token_flops(config, prefix_length + position + 1, logits=position == suffix - 1)
            for position in range(suffix)
        )
        total += sum(
            llm_token_flops(config, prefix_length + suffix + step, logits=True)
            for step in range(1, new_tokens)
        )
    return total


# timing -----------------------------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, work: Callable[[], object]) -> tuple[float, object]:
    synchronize(device)
    started = time.perf_counter()
    result = work()
    synchronize(device)
    return time.perf_counter() - started, result


def peak_matmul_gflops(device: torch.device, size: int = 2048, repeats: int = 10) -> float:
    """Best of a few fp32 `torch.mm` of two size x size matrices: the machine's practical matmul peak."""
    left, right = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    torch.mm(left, right)  # warm-up
    best = min(timed(device, lambda: torch.mm(left, right))[0] for _ in range(repeats))
    return 2 * size**3 / best / 1e9


def plain_answers(model, processor, requests: list[ImageRequest]) -> list[list[Answer]]:
    progress = tqdm(
        total=sum(len(request.queries) for request in requests), desc="plain path", file=sys.stderr
    )
    answers = []
    for request in requests:
        row = []
        for query in request.queries:
            row.append(
                generate_answer(model, processor, request.image, query.boxes, query.question, request.options)
            )
            progress.update()
        answers.append(row)
    progress.close()
    return answers


def interactive_ms(model, processor, scale: Scale, options: GenerationOptions, device) -> tuple[float, float]:
    """Median ms of the first box on a new image (fresh engine) and of a new box on that image after it."""
    first, following = [], []
    for repeat in range(scale.interactive_repeats):
        engine = RegionEngine(model, processor)
        image = noise_image(seed=500 + repeat)
        first_box, next_box = random_boxes(2000 + repeat, 2)
        first.append(timed(device, partial(ask_about_box, engine, image, first_box, options))[0])
        following.append(timed(device, partial(ask_about_box, engine, image, next_box, options))[0])
        stats = engine.stats()
        if stats["feature_cache"]["hits"] != 1 or stats["prefix_cache"]["hits"] != 1:
            raise RuntimeError(f"the next box did not reuse the image's caches: {stats}")
        logger.info("interactive %d: first %.3f s, next %.3f s", repeat, first[-1], following[-1])
    return 1000 * statistics.median(first), 1000 * statistics.median(following)


def ask_about_box(engine: RegionEngine, image: Image.Image, box: list[float], options: GenerationOptions):
    return engine.answer([ImageRequest(image, [RegionQuery(CAPTION_QUESTION, [box])], options)])


def check_lengths(name: str, answers: list[list[Answer]], new_tokens: int) -> None:
    lengths = sorted({len(answer.token_ids) for row in answers for answer in row})
    if lengths != [new_tokens]:
        raise SystemExit(f"{name}: answers have {lengths} tokens; every one must have {new_tokens}")


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()}, {torch.get_num_threads()} threads"


# ------------------------------------------------------------------------------------------------------
def run(scale: Scale, device: torch.device) -> dict:
    model, processor = build_benchmark_model(scale, device)
    options = GenerationOptions(max_new_tokens=scale.new_tokens, stop_strings=())
    requests = workload(scale, options)
    config = model.config

    encoded = processor.encode([("user", CAPTION_QUESTION)], 1, generation=True)
    prefix_length = encoded.input_ids.index(config.image_end_token_id) + 1
    suffix_lengths = [len(encoded.input_ids) - prefix_length] * (scale.images * scale.regions_per_image)
    useful = workload_flops(config, scale.images, prefix_length, suffix_lengths, scale.new_tokens)
    model_facts = {
        "vision_params": parameter_count(model.vision_tower),
        "region_encoder_params": parameter_count(model.region_encoder),
        "llm_params": parameter_count(model.language_model),
        "total_params": parameter_count(model),
        "prompt_tokens": len(encoded.input_ids),
        "prefix_tokens": prefix_length,
        "vision_gflop_per_image": round(vision_flops(config) / 1e9, 2),
        "region_fuse_gflop_per_image": round(region_fuse_flops(config) / 1e9, 2),
        "region_gflop_per_box": round(region_box_flops(config) / 1e9, 3),
    }
    logger.info("model: %s", model_facts)

    # warm both paths (lazy initialisation, allocator) on an image outside the workload
    warm_request = ImageRequest(
        noise_image(seed=999), [RegionQuery(CAPTION_QUESTION, random_boxes(999, 1))], options
    )
    plain_answers(model, processor, [warm_request])
    RegionEngine(model, processor).answer([warm_request])

    # Other work on a shared machine shifts every timing: record the 1-minute load after each phase
    # (this benchmark's own threads count in it), and take the matmul peak next to the engine run.
    plain_s, plain = timed(device, lambda: plain_answers(model, processor, requests))
    load = {"plain": os.getloadavg()[0]}
    logger.info("plain path: %.1f s", plain_s)
    peak = peak_matmul_gflops(device)
    engine = RegionEngine(model, processor)
    engine_s, fast = timed(device, lambda: engine.answer(requests))
    load["engine"] = os.getloadavg()[0]
    peak = max(peak, peak_matmul_gflops(device))
    logger.info("engine: %.1f s", engine_s)
    check_lengths("plain path", plain, scale.new_tokens)
    check_lengths("engine", fast, scale.new_tokens)
    mismatched = sum(
        slow.token_ids != quick.token_ids
        for slow_row, fast_row in zip(plain, fast, strict=True)
        for slow, quick in zip(slow_row, fast_row, strict=True)
    )
    first_ms, next_ms = interactive_ms(model, processor, scale, options, device)
    # the same with one new token: the latency before an answer can start streaming, where caching shows
    first_token_ms = interactive_ms(model, processor, scale, replace(options, max_new_tokens=1), device)

    achieved = useful / engine_s / 1e9
    questions = scale.images * scale.regions_per_image
    return {
        "benchmark": "engine",
        "quick": scale is QUICK,
        "plain_s": round(plain_s, 2),
        "engine_s": round(engine_s, 2),
        "speedup": round(plain_s / engine_s, 2),
        "regions_per_s": round(questions / engine_s, 2),
        "interactive_first_box_ms": round(first_ms, 1),
        "interactive_next_box_ms": round(next_ms, 1),
        "interactive_next_over_first": round(next_ms / first_ms, 3),
        "interactive_first_box_first_token_ms": round(first_token_ms[0], 1),
        "interactive_next_box_first_token_ms": round(first_token_ms[1], 1),
        "achieved_gflops": round(achieved, 2),
        "peak_matmul_gflops": round(peak, 2),
        "flop_efficiency": round(achieved / peak, 4),
        "useful_gflop": round(useful / 1e9, 1),
        "identical": mismatched == 0,
        "mismatched_answers": mismatched,
        "workload": {
            "images": scale.images,
            "regions_per_image": scale.regions_per_image,
            "new_tokens": scale.new_tokens,
            "interactive_repeats": scale.interactive_repeats,
        },
        "model": model_facts,
        "device": device_name(device),
        "torch": torch.__version__,
        "load_average_1m": {
            phase: round(value, 2) for phase, value in {**load, "end": os.getloadavg()[0]}.items()
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="a small model and workload: a smoke run in seconds"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--threads", type=int, default=len(os.sched_getaffinity(0)), help="CPU threads (default: all cores)"
    )
    parser.add_argument("--verbose", action="store_true", help="log progress details to stderr")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr)
    torch.set_num_threads(args.threads)
    result = run(QUICK if args.quick else FULL, torch.device(args.device))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
