"""The fast multi-region inference engine.

An annotator asks about many boxes on the same image, and bulk pre-labeling asks about every
box of every image. The plain path (generation.py) repeats almost all of its work for each
question; the engine does each piece once:

1. image features (projected image tokens and the fused region pyramid) are cached per image
   content in an LRU bounded in bytes: a new box on a seen image skips the vision tower;
2. the prompt prefix every question on an image shares (template header and image tokens,
   through `<im_end>`) is prefilled once and its KV cache reused for each question;
3. all boxes go through the region encoder in one call, and all questions (of all images) are
   prefilled and decoded as one batch with per-sequence stopping.

Rows of a batch are laid out as [prefix | padding | question], so every question ends at the
same position and decoding appends in step; the padding is masked out and positions skip it,
which keeps the answers identical, token for token, to the plain path under greedy decoding.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from transformers import Cache, DynamicCache
from transformers.cache_utils import DynamicLayer

from .generation import (
    Answer,
    GenerationOptions,
    StopOnText,
    build_answer,
    eos_token_ids,
    stop_strings_for,
)
from .loading import load_pretrained
from .modeling import ImageFeatures, RegionLLMForCausalLM
from .processing import Box, RegionProcessor, check_boxes

logger = logging.getLogger(__name__)

KVLayers = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class RegionQuery:
    """A question about some boxes; `<regionK>` in the text means boxes[K-1]."""

    question: str
    boxes: Sequence[Box]


@dataclass
class ImageRequest:
    image: Image.Image
    queries: list[RegionQuery]
    options: GenerationOptions = field(default_factory=GenerationOptions)


def _tensor_bytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, ImageFeatures):
        return _tensor_bytes(value.tokens) + sum(_tensor_bytes(level) for level in value.pyramid)
    return sum(_tensor_bytes(item) for item in value)


class ByteBoundedLRU:
    """An LRU whose entries are evicted, least recently used first, to stay under a byte budget."""

    def __init__(self, max_bytes: int, size_of: Callable[[object], int] = _tensor_bytes):
        self.max_bytes = max_bytes
        self.size_of = size_of
        self.entries: OrderedDict[str, tuple[object, int]] = OrderedDict()
        self.bytes = 0
        self.peak_bytes = 0
        self.hits = 0
        self.misses = 0

    def get(self, key: str):
        entry = self.entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self.hits += 1
        self.entries.move_to_end(key)
        return entry[0]

    def put(self, key: str, value) -> None:
        size = self.size_of(value)
        if size > self.max_bytes:
            return  # larger than the whole budget: not worth evicting everything for
        if key in self.entries:
            self.bytes -= self.entries.pop(key)[1]
        self.entries[key] = (value, size)
        self.bytes += size
        while self.bytes > self.max_bytes:
            self.bytes -= self.entries.popitem(last=False)[1][1]
        self.peak_bytes = max(self.peak_bytes, self.bytes)

    def clear(self) -> None:
        self.entries.clear()
        self.bytes = 0


def image_key(image: Image.Image) -> str:
    """Content hash of the displayed image: equal pixels, equal key, whatever the URL."""
    digest = hashlib.sha256(image.tobytes())
    digest.update(f"{image.mode}:{image.width}x{image.height}".encode())
    return digest.hexdigest()


@dataclass
class _Row:
    """One question of one image, tokenized."""

    image_index: int
    suffix_ids: list[int]
    boxes: torch.Tensor  # in <bbox> order
    options: GenerationOptions
    stop_strings: list[str]


class RegionEngine:
    def __init__(
        self,
        model: RegionLLMForCausalLM,
        processor: RegionProcessor,
        *,
        feature_cache_bytes: int = 1 << 30,
        prefix_cache_bytes: int = 1 << 30,
        max_batch_rows: int = 64,
    ):
        self.model = model.eval()
        self.processor = processor
        self.features = ByteBoundedLRU(feature_cache_bytes)
        self.prefixes = ByteBoundedLRU(prefix_cache_bytes)
        self.max_batch_rows = max_batch_rows
        self.eos_ids = eos_token_ids(model)
        self.image_end_id = model.config.image_end_token_id
        # The LoRA adapter answering now (roi_model.adapters; "" the base): prefix KV caches are its own.
        self.variant = ""

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, *, device: str | None = None, dtype: torch.dtype | None = None, **kwargs
    ) -> RegionEngine:
        model, processor = load_pretrained(directory, device=device, dtype=dtype)
        return cls(model, processor, **kwargs)

    @property
    def device(self) -> torch.device:
        return self.model.device

    def stats(self) -> dict:
        stats = {
            "feature_cache": {
                "hits": self.features.hits,
                "misses": self.features.misses,
                "bytes": self.features.bytes,
            },
            "prefix_cache": {
                "hits": self.prefixes.hits,
                "misses": self.prefixes.misses,
                "bytes": self.prefixes.bytes,
            },
            "peak_cache_bytes": self.features.peak_bytes + self.prefixes.peak_bytes,
        }
        if self.device.type == "cuda":
            stats["peak_device_bytes"] = torch.cuda.max_memory_allocated(self.device)
        return stats

    # ---------------------------------------------------------------------------------------------
    def answer(self, requests: Sequence[ImageRequest], *, remember: bool = True) -> list[list[Answer]]:
        """Every answer of every request, in order. Bad input raises ValueError before any work.

        remember=False answers from the caches but adds nothing to them: bulk pre-labeling sees each image
        once, and must neither grow with the selection nor evict the images annotators are working on.
        """
        rows_per_request = [self._tokenize(index, request) for index, request in enumerate(requests)]
        rows = [row for rows in rows_per_request for row in rows]
        answers: list[Answer] = []
        with torch.inference_mode():
            keys = [image_key(request.image) for request in requests]
            features = self._image_features(requests, keys, remember)
            for start in range(0, len(rows), self.max_batch_rows):
                batch = rows[start : start + self.max_batch_rows]
                answers += self._answer_rows(batch, keys, features, remember)
        results, position = [], 0
        for rows in rows_per_request:
            results.append(answers[position : position + len(rows)])
            position += len(rows)
        return results

    def _tokenize(self, image_index: int, request: ImageRequest) -> list[_Row]:
        rows = []
        for query in request.queries:
            boxes = check_boxes(query.boxes)
            encoded = self.processor.encode([("user", query.question)], len(boxes), generation=True)
            prefix_length = self._prefix_length(encoded.input_ids)
            rows.append(
                _Row(
                    image_index,
                    encoded.input_ids[prefix_length:],
                    boxes[encoded.box_order],
                    request.options,
                    stop_strings_for(self.model, request.options),
                )
            )
        return rows

    def _prefix_length(self, input_ids: list[int]) -> int:
        return input_ids.index(self.image_end_id) + 1

    # image features ------------------------------------------------------------------------------
    def _image_features(
        self, requests: Sequence[ImageRequest], keys: list[str], remember: bool
    ) -> dict[str, ImageFeatures]:
        found = {key: self.features.get(key) for key in dict.fromkeys(keys)}
        missing = [key for key, value in found.items() if value is None]
        if missing:
            first_request = {key: requests[keys.index(key)] for key in missing}
            pixels = torch.stack([self.processor.pixel_values(first_request[key].image) for key in missing])
            computed = self.model.get_image_features(pixels.to(self.device))
            for index, key in enumerate(missing):
                found[key] = computed.select([index])
                if remember:
                    self.features.put(key, found[key])
        return found

    # prefix KV cache -----------------------------------------------------------------------------
    def forget_variant(self, variant: str) -> None:
        """Drop the prefix caches computed under an adapter that is unloaded."""
        for key in [key for key in self.prefixes.entries if key.startswith(f"{variant}|")]:
            self.prefixes.bytes -= self.prefixes.entries.pop(key)[1]

    def _prefix_caches(
        self, prefix_ids: list[int], keys: list[str], features: dict[str, ImageFeatures], remember: bool
    ) -> dict[str, KVLayers]:
        found = {key: self.prefixes.get(f"{self.variant}|{key}") for key in dict.fromkeys(keys)}
        missing = [key for key, value in found.items() if value is None]
        if missing:
            ids = torch.tensor([prefix_ids] * len(missing), device=self.device)
            image_tokens = torch.cat([features[key].tokens for key in missing])
            embeds = self.model.embed_inputs(ids, image_tokens)
            output = self.model.language_model(inputs_embeds=embeds, use_cache=True, logits_to_keep=1)
            layers = _cache_layers(output.cache)
            for index, key in enumerate(missing):
                # A copy, not a view: a view would keep the whole batch's KV alive behind one entry's bytes.
                found[key] = [(k[index : index + 1].clone(), v[index : index + 1].clone()) for k, v in layers]
                if remember:
                    self.prefixes.put(f"{self.variant}|{key}", found[key])
        return found

    # one batch of questions ----------------------------------------------------------------------
    def _answer_rows(
        self, rows: list[_Row], keys: list[str], features: dict[str, ImageFeatures], remember: bool
    ) -> list[Answer]:
        # every question on every image shares the same prefix token ids (the image is a placeholder)
        prefix_ids = self._shared_prefix_ids()
        row_keys = [keys[row.image_index] for row in rows]
        prefixes = self._prefix_caches(prefix_ids, row_keys, features, remember)
        prefix_length = len(prefix_ids)

        # the region encoder once for all boxes: grouped by image, rows ordered image by image
        order = sorted(range(len(rows)), key=lambda index: row_keys[index])
        rows = [rows[index] for index in order]
        row_keys = [row_keys[index] for index in order]
        region_tokens = self._region_tokens(rows, row_keys, features)

        # [prefix | padding | question] rows, ending together
        longest = max(len(row.suffix_ids) for row in rows)
        pad_id = self.processor.tokenizer.pad_token_id
        suffix_ids = torch.tensor(
            [[pad_id] * (longest - len(row.suffix_ids)) + row.suffix_ids for row in rows]
        )
        suffix_mask = torch.tensor(
            [[0] * (longest - len(row.suffix_ids)) + [1] * len(row.suffix_ids) for row in rows]
        )
        suffix_ids, suffix_mask = suffix_ids.to(self.device), suffix_mask.to(self.device)
        attention_mask = torch.cat(
            [torch.ones(len(rows), prefix_length, dtype=torch.long, device=self.device), suffix_mask], 1
        )
        positions = (prefix_length + suffix_mask.cumsum(1) - 1).clamp(min=prefix_length)
        capacity = prefix_length + longest + max(row.options.max_new_tokens for row in rows)
        cache = _batch_cache(prefixes, row_keys, prefix_length, capacity)
        embeds = self.model.embed_inputs(suffix_ids, None, region_tokens)
        output = self.model.language_model(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            position_ids=positions,
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        tokens, log_probs = self._decode(rows, output.logits[:, -1], cache, attention_mask, positions[:, -1])
        answers = [self._to_answer(*parts) for parts in zip(rows, tokens, log_probs, strict=True)]
        restored: list[Answer] = [None] * len(rows)  # type: ignore[list-item]
        for answer, index in zip(answers, order, strict=True):
            restored[index] = answer
        return restored

    def _shared_prefix_ids(self) -> list[int]:
        encoded = self.processor.encode([("user", "x")], 0, generation=True)
        return encoded.input_ids[: self._prefix_length(encoded.input_ids)]

    def _region_tokens(self, rows: list[_Row], row_keys: list[str], features: dict[str, ImageFeatures]):
        image_keys = list(dict.fromkeys(row_keys))
        boxes_per_image = [
            torch.cat([row.boxes for row, key in zip(rows, row_keys, strict=True) if key == image_key_]).to(
                self.device
            )
            for image_key_ in image_keys
        ]
        if not any(len(boxes) for boxes in boxes_per_image):
            return None
        pyramids = [
            torch.cat([features[key].pyramid[level] for key in image_keys])
            for level in range(len(features[image_keys[0]].pyramid))
        ]
        return self.model.get_region_features(pyramids, boxes_per_image)

    def _decode(self, rows, logits, cache, attention_mask, last_positions):
        """Greedy or sampled decoding of the whole batch; finished rows leave the batch."""
        batch = len(rows)
        limits = torch.tensor([row.options.max_new_tokens for row in rows], device=self.device)
        generated = torch.full(
            (batch, int(limits.max())), self.processor.tokenizer.pad_token_id, device=self.device
        )
        log_probs = torch.zeros(generated.shape, device=self.device)
        lengths = torch.zeros(batch, dtype=torch.long, device=self.device)
        active = torch.arange(batch, device=self.device)
        stop_criteria = StopOnText(self.processor.tokenizer, [row.stop_strings for row in rows])
        any_stop_strings = any(row.stop_strings for row in rows)
        temperature = torch.tensor(
            [row.options.temperature if row.options.do_sample else 0.0 for row in rows], device=self.device
        )
        top_p = torch.tensor([row.options.top_p for row in rows], device=self.device)
        eos = torch.tensor(self.eos_ids or [-1], device=self.device)

        for step in range(int(limits.max())):
            scores = torch.log_softmax(logits.float(), dim=-1)
            next_tokens = _choose_tokens(logits.float(), temperature[active], top_p[active])
            generated[active, step] = next_tokens
            log_probs[active, step] = scores.gather(1, next_tokens[:, None]).squeeze(1)
            lengths[active] = step + 1
            done = torch.isin(next_tokens, eos) | (lengths[active] >= limits[active])
            if any_stop_strings:
                done |= stop_criteria(generated[active, : step + 1], rows=active)
            if bool(done.all()):
                break
            if bool(done.any()):
                keep = (~done).nonzero().squeeze(1)
                cache.batch_select_indices(keep)
                active, next_tokens = active[keep], next_tokens[keep]
                attention_mask, last_positions = attention_mask[keep], last_positions[keep]
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(active), 1)], dim=1)
            last_positions = last_positions + 1
            output = self.model.language_model(
                input_ids=next_tokens[:, None],
                attention_mask=attention_mask,
                position_ids=last_positions[:, None],
                cache=cache,
                use_cache=True,
            )
            logits = output.logits[:, -1]
        return (
            [generated[row, : lengths[row]].tolist() for row in range(batch)],
            [log_probs[row, : lengths[row]] for row in range(batch)],
        )

    def _to_answer(self, row: _Row, token_ids: list[int], log_probs: torch.Tensor) -> Answer:
        return build_answer(self.processor, token_ids, log_probs, self.eos_ids, row.stop_strings)


class _ReservedLayer(DynamicLayer):
    """A KV layer with room reserved for every token still to come.

    DynamicLayer appends by concatenation, which copies the whole batch's cache at every decoding step
    (for 64 rows of ~260 positions on a 12-layer, 768-wide LM: ~1.2 GB a step, over a third of a bulk
    call on a CPU); here an append writes into the room and the layer exposes a view of its filled part.
    """

    def __init__(self, room_keys: torch.Tensor, room_values: torch.Tensor, length: int):
        super().__init__()
        self.device = room_keys.device
        self.room_keys, self.room_values = room_keys, room_values
        self.is_initialized = True
        self._expose(length)

    def _expose(self, length: int) -> None:
        self.length = length
        self.keys, self.values = self.room_keys[:, :, :length], self.room_values[:, :, :length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        end = self.length + key_states.shape[-2]
        if end > self.room_keys.shape[-2]:
            raise RuntimeError(f"KV cache room of {self.room_keys.shape[-2]} positions exceeded")
        self.room_keys[:, :, self.length : end] = key_states
        self.room_values[:, :, self.length : end] = value_states
        self._expose(end)
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.room_keys, self.room_values = self.room_keys[indices], self.room_values[indices]
        self._expose(self.length)


class _ReservedCache(DynamicCache):
    def __init__(self, layers: list[_ReservedLayer]):
        Cache.__init__(self, layers=layers)


def _batch_cache(
    prefixes: dict[str, KVLayers], row_keys: list[str], prefix_length: int, capacity: int
) -> _ReservedCache:
    """Each row's prefix cache, copied once into a batch with room for `capacity` positions.

    Rows come grouped by image, so each image's prefix is broadcast into its run of rows."""
    runs = [(key, len(list(run))) for key, run in itertools.groupby(row_keys)]
    layers = []
    for layer in range(len(prefixes[row_keys[0]])):
        rooms = []
        for part in (0, 1):  # keys, values
            first = prefixes[row_keys[0]][layer][part]
            room = first.new_empty(len(row_keys), first.shape[1], capacity, first.shape[3])
            start = 0
            for key, count in runs:
                room[start : start + count, :, :prefix_length] = prefixes[key][layer][part]
                start += count
            rooms.append(room)
        layers.append(_ReservedLayer(*rooms, prefix_length))
    return _ReservedCache(layers)


def _cache_layers(cache) -> KVLayers:
    return [(layer.keys, layer.values) for layer in cache.layers]


def _choose_tokens(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Argmax where temperature is 0, else nucleus sampling at each row's temperature and top_p."""
    greedy = logits.argmax(dim=-1)
    sampled_rows = temperature > 0
    if not bool(sampled_rows.any()):
        return greedy
    probs = torch.softmax(logits / temperature.clamp(min=1e-6)[:, None], dim=-1)
    sorted_probs, sorted_ids = probs.sort(dim=-1, descending=True)
    outside_nucleus = sorted_probs.cumsum(-1) - sorted_probs > top_p[:, None]
    sorted_probs = sorted_probs.masked_fill(outside_nucleus, 0.0)
    choice = sorted_ids.gather(1, torch.multinomial(sorted_probs, 1)).squeeze(1)
    return torch.where(sampled_rows, choice, greedy)
