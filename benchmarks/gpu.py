"""Engine throughput on the GPT4RoI-7B shape (random weights) against the GPU's memory-bandwidth bound.

Builds `gpt4roi_7b_config()` with random weights on the GPU (bf16 by default), measures the card's
memory bandwidth with a large device-to-device copy, then times RegionEngine on a fixed workload
(N images, K region questions each, T new tokens, greedy, no early stop):
- prefill: vision tower, region encoder and the prompt (the shared image prefix once per image);
- decode: every step reads each LLM weight once, so steps/s <= bandwidth / LLM weight bytes, and
  decode tokens/s <= rows x that. The JSON line reports both and their ratio.
Prints one JSON line; without a CUDA device it prints {"skipped": "no CUDA device"} and exits 0.
`--device cpu --config tiny-clip` runs the same measurement on a small model, to check the script.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GenerationConfig, PreTrainedTokenizerFast

from roi_model.assembly import add_special_tokens
from roi_model.configuration import GPT4ROI_SYSTEM_PROMPT, IMAGE_PROMPT
from roi_model.engine import ImageRequest, RegionEngine, RegionQuery
from roi_model.generation import GenerationOptions
from roi_model.modeling import RegionLLMForCausalLM
from roi_model.presets import preset_config
from roi_model.processing import RegionProcessor

QUESTION = "Can you give a description of the region mentioned by <region1>?"
LLAMA_VOCAB = 32000
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def llama_sized_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level stand-in for LLaMA's tokenizer: 32000 entries, the prompt's words among them, [PAD] after."""
    words = f"{GPT4ROI_SYSTEM_PROMPT} {IMAGE_PROMPT} {QUESTION} Human Assistant region1".replace("\n", " ")
    known = dict.fromkeys(["<unk>", "<s>", "</s>", *list("#:?.,'<>"), *words.split()])
    vocab = {token: index for index, token in enumerate(known)}
    for filler in range(LLAMA_VOCAB - len(vocab)):
        vocab[f"w{filler}"] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="[PAD]"
    )


def build_engine(config_name: str, device: torch.device, dtype: torch.dtype, attention: str) -> RegionEngine:
    config = preset_config(config_name)
    config.template, config.stop_strings = "gpt4roi_v0", ["###"]
    config.system_prompt, config.image_prompt = GPT4ROI_SYSTEM_PROMPT, IMAGE_PROMPT
    tokenizer = llama_sized_tokenizer()
    add_special_tokens(tokenizer, config)
    config.text_config.vocab_size = max(config.text_config.vocab_size, len(tokenizer))
    torch.manual_seed(0)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            model = RegionLLMForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(default_dtype)
    model.set_attn_implementation(attention)
    # no end-of-sequence: every row decodes exactly the asked number of tokens
    model.generation_config = GenerationConfig(pad_token_id=tokenizer.pad_token_id)
    processor = RegionProcessor(tokenizer, config, model.num_image_tokens)
    return RegionEngine(model, processor, max_batch_rows=1 << 16)


def workload(images: int, regions: int, new_tokens: int) -> list[ImageRequest]:
    rng = np.random.default_rng(0)
    options = GenerationOptions(max_new_tokens=new_tokens, stop_strings=())
    requests = []
    for _ in range(images):
        image = Image.fromarray(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8))
        queries = []
        for _ in range(regions):
            x1, y1 = rng.uniform(0, 0.7, 2)
            width, height = rng.uniform(0.05, 0.3, 2)
            queries.append(RegionQuery(QUESTION, [[x1, y1, x1 + width, y1 + height]]))
        requests.append(ImageRequest(image, queries, options))
    return requests


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_answer(engine: RegionEngine, requests: list[ImageRequest]) -> tuple[float, list]:
    """Seconds for one cold call: both caches emptied, so every image and prefix is computed again."""
    engine.features.clear()
    engine.prefixes.clear()
    synchronize(engine.device)
    started = time.perf_counter()
    answers = engine.answer(requests)
    synchronize(engine.device)
    return time.perf_counter() - started, answers


def memory_bandwidth(device: torch.device, megabytes: int, repeats: int = 10) -> float:
    """Bytes per second of a device-to-device copy (each byte is read once and written once)."""
    source = torch.empty(megabytes * 2**20, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    target.copy_(source)
    synchronize(device)
    started = time.perf_counter()
    for _ in range(repeats):
        target.copy_(source)
    synchronize(device)
    return 2 * source.numel() * repeats / (time.perf_counter() - started)


def processed_prompt_tokens(engine: RegionEngine, requests: list[ImageRequest]) -> int:
    """Tokens the engine prefills: each image's shared prefix once, then every question's own tail."""
    total = 0
    for request in requests:
        for index, query in enumerate(request.queries):
            ids = engine.processor.encode(
                [("user", query.question)], len(query.boxes), generation=True
            ).input_ids
            prefix = ids.index(engine.model.config.image_end_token_id) + 1
            total += len(ids) - prefix + (prefix if index == 0 else 0)
    return total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="gpt4roi-7b", help="a named config (roi_model.presets)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    parser.add_argument("--attention", default="sdpa", choices=["sdpa", "eager"])
    parser.add_argument("--images", type=int, default=1)
    parser.add_argument("--regions", type=int, default=16, help="questions per image (one box each)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--copy-megabytes", type=int, default=2048, help="size of the bandwidth probe")
    args = parser.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(json.dumps({"benchmark": "gpu", "skipped": "no CUDA device"}))
        return 0
    if args.new_tokens < 2:
        parser.error("--new-tokens must be at least 2 (one prefill token, then decode steps)")
    dtype = DTYPES[args.dtype]

    engine = build_engine(args.config, device, dtype, args.attention)
    model = engine.model
    requests = workload(args.images, args.regions, args.new_tokens)
    first_token = workload(args.images, args.regions, 1)
    timed_answer(engine, workload(args.images, args.regions, 2))  # warm-up: kernels, allocator

    prefill_times, total_times = [], []
    for _ in range(args.repeats):
        prefill_times.append(timed_answer(engine, first_token)[0])
        seconds, answers = timed_answer(engine, requests)
        total_times.append(seconds)
    lengths = {len(answer.token_ids) for answers_of_image in answers for answer in answers_of_image}
    if lengths != {args.new_tokens}:
        raise SystemExit(f"rows decoded {sorted(lengths)} tokens, expected {args.new_tokens} each")

    rows = args.images * args.regions
    prefill = statistics.median(prefill_times)
    decode = statistics.median(total_times) - prefill
    steps = args.new_tokens - 1
    prompt_tokens = processed_prompt_tokens(engine, requests)

    bandwidth = memory_bandwidth(device, args.copy_megabytes)
    language_model = model.language_model
    # a decode step reads every LLM weight once, except the embedding table (one row per token)
    step_bytes = sum(p.numel() * p.element_size() for p in language_model.parameters()) - (
        language_model.get_input_embeddings().weight.numel() * dtype.itemsize
    )
    bound_step = step_bytes / bandwidth
    parameters = {name: sum(p.numel() for p in part.parameters()) for name, part in model.named_children()}
    parameters["total"] = sum(parameters.values())
    result = {
        "benchmark": "gpu",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "config": args.config,
        "dtype": args.dtype,
        "attention": args.attention,
        "images": args.images,
        "rows": rows,
        "new_tokens": args.new_tokens,
        "parameters": parameters,
        "prefill": {
            "tokens": prompt_tokens,
            "seconds": round(prefill, 4),
            "tokens_per_s": round(prompt_tokens / prefill, 1),
        },
        "decode": {
            "steps": steps,
            "tokens": rows * steps,
            "seconds": round(decode, 4),
            "ms_per_step": round(1000 * decode / steps, 3),
            "tokens_per_s": round(rows * steps / decode, 1),
        },
        "bandwidth_GBps": round(bandwidth / 1e9, 1),
        "decode_bytes_per_step_GB": round(step_bytes / 1e9, 3),
        "bound": {
            "ms_per_step": round(1000 * bound_step, 3),
            "tokens_per_s": round(rows / bound_step, 1),
        },
        "decode_fraction_of_bound": round(bound_step / (decode / steps), 3),
    }
    if device.type == "cuda":
        result["peak_memory_GB"] = round(torch.cuda.max_memory_allocated(device) / 1e9, 2)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
