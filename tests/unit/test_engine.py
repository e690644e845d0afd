"""The fast engine gives, token for token, the plain path's greedy answers, and does less work."""

from __future__ import annotations

import pytest
import torch
from tiny_models import make_tiny, noise_image

from roi_model.engine import ByteBoundedLRU, ImageRequest, RegionEngine, RegionQuery
from roi_model.generation import GenerationOptions, generate_answer

CAPTION = "Describe <region1> briefly."


def mixed_requests() -> list[ImageRequest]:
    """Different images (sizes, aspect ratios), numbers of regions, question lengths and token limits."""
    return [
        ImageRequest(
            noise_image(200, 100, 1),
            [
                RegionQuery(CAPTION, [[0.1, 0.1, 0.5, 0.5]]),
                RegionQuery("Is <region1> left of <region2>?", [[0.1, 0.1, 0.5, 0.5], [0.6, 0.2, 0.9, 0.8]]),
                RegionQuery(
                    "Which is larger, <region2> or <region1>? what colour is <region3>?",
                    [[0.0, 0.0, 1.0, 1.0], [0.3, 0.3, 0.6, 0.6], [0.7, 0.1, 0.95, 0.3]],
                ),
            ],
            GenerationOptions(max_new_tokens=9),
        ),
        ImageRequest(
            noise_image(90, 150, 2),
            [RegionQuery("What colour is <region1>?", [[0.2, 0.3, 0.4, 0.9]])],
            GenerationOptions(max_new_tokens=4),
        ),
        ImageRequest(
            noise_image(64, 64, 3),
            [RegionQuery(CAPTION, [[0.5, 0.5, 0.7, 0.6]]), RegionQuery(CAPTION, [[0.05, 0.6, 0.3, 0.95]])],
            GenerationOptions(max_new_tokens=7),
        ),
    ]


def plain_answers(model, processor, requests):
    return [
        [
            generate_answer(model, processor, request.image, query.boxes, query.question, request.options)
            for query in request.queries
        ]
        for request in requests
    ]


@pytest.mark.parametrize("kind", ["convnext", "clip"])
def test_engine_matches_the_plain_path_token_for_token(kind):
    model, processor = make_tiny(kind)
    requests = mixed_requests()
    engine_answers = RegionEngine(model, processor).answer(requests)
    for plain_row, engine_row in zip(plain_answers(model, processor, requests), engine_answers, strict=True):
        for plain, fast in zip(plain_row, engine_row, strict=True):
            assert fast.token_ids == plain.token_ids
            assert fast.text == plain.text
            assert fast.score == pytest.approx(plain.score, abs=1e-4)
            assert fast.truncated == plain.truncated


def same_answers(got, expected) -> bool:
    return all(
        a.token_ids == b.token_ids and a.text == b.text and a.score == pytest.approx(b.score, abs=1e-5)
        for got_row, expected_row in zip(got, expected, strict=True)
        for a, b in zip(got_row, expected_row, strict=True)
    )


def test_small_batches_and_repeated_calls_give_the_same_answers(tiny):
    model, processor = tiny
    requests = mixed_requests()
    expected = RegionEngine(model, processor).answer(requests)
    assert same_answers(RegionEngine(model, processor, max_batch_rows=2).answer(requests), expected)
    engine = RegionEngine(model, processor)
    engine.answer(requests[:1])
    assert same_answers(engine.answer(requests), expected)  # caches warm for the first image


def test_a_new_box_on_a_seen_image_skips_the_vision_tower_and_the_prefix(tiny):
    model, processor = tiny
    engine = RegionEngine(model, processor)
    image = noise_image(120, 90, 5)
    vision_calls = []
    hook = model.vision_tower.register_forward_hook(lambda *_: vision_calls.append(1))
    try:
        engine.answer([ImageRequest(image, [RegionQuery(CAPTION, [[0.1, 0.1, 0.4, 0.4]])])])
        engine.answer([ImageRequest(image.copy(), [RegionQuery(CAPTION, [[0.5, 0.5, 0.9, 0.8]])])])
    finally:
        hook.remove()
    assert len(vision_calls) == 1
    stats = engine.stats()
    assert stats["feature_cache"]["hits"] == 1 and stats["prefix_cache"]["hits"] == 1
    assert stats["peak_cache_bytes"] > 0


def test_caches_stay_within_their_byte_budget(tiny):
    model, processor = tiny
    probe = RegionEngine(model, processor)
    probe.answer([ImageRequest(noise_image(50, 50), [RegionQuery(CAPTION, [[0.1, 0.1, 0.4, 0.4]])])])
    one_image = probe.features.bytes
    engine = RegionEngine(model, processor, feature_cache_bytes=2 * one_image + 1)
    for seed in range(5):
        engine.answer(
            [ImageRequest(noise_image(50, 50, seed), [RegionQuery(CAPTION, [[0.1, 0.1, 0.4, 0.4]])])]
        )
    assert len(engine.features.entries) == 2
    assert engine.features.bytes <= engine.features.max_bytes
    assert engine.features.peak_bytes <= engine.features.max_bytes


def test_bulk_answers_add_nothing_to_the_caches_and_match_remembered_ones(tiny):
    model, processor = tiny
    requests = mixed_requests()
    expected = RegionEngine(model, processor).answer(requests)
    engine = RegionEngine(model, processor)
    assert same_answers(engine.answer(requests, remember=False), expected)
    assert engine.features.entries == {} and engine.prefixes.entries == {}
    assert engine.features.peak_bytes == engine.prefixes.peak_bytes == 0


def test_a_cached_prefix_holds_its_own_rows_only(tiny):
    # The bytes an entry is charged are the bytes it keeps alive: a view into the batch's KV would keep
    # every image of the batch alive behind the budget's back.
    model, processor = tiny
    engine = RegionEngine(model, processor)
    engine.answer(mixed_requests())
    for entry, charged in engine.prefixes.entries.values():
        held = sum(t.untyped_storage().nbytes() for layer in entry for t in layer)
        assert held == charged


def test_lru_evicts_the_least_recently_used():
    cache = ByteBoundedLRU(max_bytes=3 * 4 * 10)  # room for three 10-float tensors
    for key in "abc":
        cache.put(key, torch.zeros(10))
    cache.get("a")
    cache.put("d", torch.zeros(10))
    assert list(cache.entries) == ["c", "a", "d"]
    cache.put("huge", torch.zeros(1000))
    assert "huge" not in cache.entries


def test_each_row_stops_on_its_own_stop_strings(tiny):
    model, processor = tiny
    image = noise_image(80, 80, 7)
    box = [[0.2, 0.2, 0.7, 0.7]]
    (free,) = RegionEngine(model, processor).answer(
        [ImageRequest(image, [RegionQuery(CAPTION, box)], GenerationOptions(max_new_tokens=6))]
    )
    first_word = processor.tokenizer.decode(free[0].token_ids[:1])
    stopping = GenerationOptions(max_new_tokens=6, stop_strings=(first_word,))
    answers = RegionEngine(model, processor).answer(
        [
            ImageRequest(image, [RegionQuery(CAPTION, box)], stopping),
            ImageRequest(image, [RegionQuery(CAPTION, box)], GenerationOptions(max_new_tokens=6)),
        ]
    )
    assert len(answers[0][0].token_ids) == 1 and answers[0][0].text == ""
    assert not answers[0][0].truncated  # a stop string ended it
    assert answers[1][0].token_ids == free[0].token_ids
    assert (
        answers[0][0].token_ids == generate_answer(model, processor, image, box, CAPTION, stopping).token_ids
    )


def test_bad_input_fails_before_any_work(tiny):
    model, processor = tiny
    engine = RegionEngine(model, processor)
    good = ImageRequest(noise_image(40, 40), [RegionQuery(CAPTION, [[0.1, 0.1, 0.4, 0.4]])])
    bad = ImageRequest(noise_image(40, 40, 1), [RegionQuery(CAPTION, [[0.5, 0.5, 0.5, 0.8]])])
    with pytest.raises(ValueError, match="zero area"):
        engine.answer([good, bad])
    assert engine.stats()["feature_cache"]["misses"] == 0


def with_options(requests: list[ImageRequest], **options) -> list[ImageRequest]:
    return [
        ImageRequest(
            request.image,
            request.queries,
            GenerationOptions(max_new_tokens=request.options.max_new_tokens, **options),
        )
        for request in requests
    ]


def token_ids(answers) -> list[list[int]]:
    return [answer.token_ids for row in answers for answer in row]


def test_sampling_through_the_engine_honours_top_p(tiny):
    """A nucleus that holds only the likeliest token is greedy decoding, whatever the temperature; the same
    temperature with the whole distribution (top_p=1) samples other tokens."""
    model, processor = tiny
    requests = mixed_requests()
    greedy = token_ids(RegionEngine(model, processor).answer(requests))

    torch.manual_seed(0)
    narrow = RegionEngine(model, processor).answer(
        with_options(requests, do_sample=True, temperature=5.0, top_p=1e-6)
    )
    torch.manual_seed(0)
    wide = RegionEngine(model, processor).answer(with_options(requests, do_sample=True, temperature=5.0))

    assert token_ids(narrow) == greedy
    assert token_ids(wide) != greedy  # dozens of tokens from a flattened distribution: not all the argmax


def test_nucleus_sampling_draws_only_from_the_smallest_set_reaching_top_p():
    from roi_model.engine import _choose_tokens

    torch.manual_seed(0)
    # probabilities 0.5, 0.3, 0.15, 0.05: top_p=0.6 keeps the first two (0.5 alone is short of 0.6)
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().expand(4000, 4)
    temperature, top_p = torch.ones(4000), torch.full((4000,), 0.6)

    drawn = torch.bincount(_choose_tokens(logits, temperature, top_p), minlength=4)

    assert drawn[2:].tolist() == [0, 0]
    assert drawn[0] / 4000 == pytest.approx(0.5 / 0.8, abs=0.03)  # renormalized within the nucleus
    greedy_rows = _choose_tokens(logits, torch.tensor([0.0, 1.0] * 2000), torch.full((4000,), 1e-6))
    assert greedy_rows.tolist() == [0] * 4000
