"""GPT4RoI-7B conversion: a tiny release in the real layout, converted, must reproduce GPT4RoI's forward pass.

The reference forward below is written from GPT4RoI's layer descriptions (region-llms.md §A.1)
with plain torch ops, torchvision's roi_align and a Hugging Face LlamaForCausalLM; it shares no
code with roi_model, so a wrong key mapping, a transposed level order or a missed delta cannot pass.
"""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from fake_checkpoints import (
    CLIP_WIDTH,
    LEVELS,
    ROI,
    ROUNDS,
    llama_config,
    write_clip,
    write_gpt4roi_release,
)
from gpt4roi_reference import official_pixel_values, official_prompt, slow_tokenize
from PIL import Image
from safetensors import safe_open
from tiny_models import noise_image
from torchvision.ops import roi_align
from transformers import LlamaForCausalLM

from roi_model.cli import main as cli_main
from roi_model.convert import CheckpointError, convert_gpt4roi, llama_base
from roi_model.convert.gpt4roi import our_name
from roi_model.generation import GenerationOptions, generate_answer
from roi_model.loading import load_pretrained
from roi_model.processing import check_boxes

IMAGE = 224
STRIDES = [14 / 8, 14 / 4, 14 / 2, 14]  # GPT4RoI's featmap_strides
LEVEL_SIZES = [128, 64, 32, 16]
REGION_LAYERS = [-11, -8, -5, -2]
GROUPS = 64
BOXES = torch.tensor([[0.10, 0.15, 0.55, 0.70], [0.0, 0.0, 1.0, 1.0], [0.62, 0.40, 0.71, 0.52]])


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return write_gpt4roi_release(tmp_path_factory.mktemp("release"))


@pytest.fixture(scope="module")
def converted(release, tmp_path_factory):
    out = tmp_path_factory.mktemp("converted") / "gpt4roi-7b"
    summary = convert_gpt4roi(release.delta, release.base, release.clip, out, dtype="float32")
    return out, summary


# the reference: GPT4RoI's forward pass from its description ----------------------------------------------
def spi_weight(weights, name):
    return weights["model.spi_module." + name]


def with_coordinates(feature_map):
    _, _, height, width = feature_map.shape
    y, x = torch.meshgrid(torch.linspace(-1, 1, height), torch.linspace(-1, 1, width), indexing="ij")
    return torch.cat([feature_map, x[None, None], y[None, None]], dim=1)


def resize(feature_map, size):
    return F.interpolate(feature_map, size=size, mode="bilinear", align_corners=True)


def reference_region_tokens(weights, hidden_states, boxes):
    """MLVLROIQueryModule: pyramid, coord conv, 5 scale-shuffle rounds, multi-level RoIAlign, heads."""
    grid = IMAGE // 14
    levels = [
        hidden_states[layer][:, 1:].reshape(1, grid, grid, CLIP_WIDTH).permute(0, 3, 1, 2)
        for layer in REGION_LAYERS
    ]
    levels = [resize(level, (size, size)) for level, size in zip(levels, LEVEL_SIZES, strict=True)]
    levels = [
        F.conv2d(
            with_coordinates(level),
            spi_weight(weights, f"mlvl_fuse.input_conv.{index}.weight"),
            spi_weight(weights, f"mlvl_fuse.input_conv.{index}.bias"),
        )
        for index, level in enumerate(levels)
    ]
    quarter = CLIP_WIDTH // 4
    remain = CLIP_WIDTH - 2 * quarter
    for round_ in range(ROUNDS):
        shuffled = []
        for index, level in enumerate(levels):
            coarser = levels[min(index + 1, LEVELS - 1)][:, remain:][:, quarter:]
            finer = levels[max(index - 1, 0)][:, remain:][:, :quarter]
            size = level.shape[-2:]
            shuffled.append(torch.cat([level[:, :remain], resize(coarser, size), resize(finer, size)], dim=1))
        prefix = f"mlvl_fuse.fuse_convs.{round_}."
        levels = [
            F.relu(
                F.group_norm(
                    F.conv2d(level, spi_weight(weights, prefix + "conv.weight"), padding=1),
                    GROUPS,
                    spi_weight(weights, prefix + "gn.weight"),
                    spi_weight(weights, prefix + "gn.bias"),
                    eps=1e-5,
                )
            )
            for level in shuffled
        ]
    rois = torch.cat([torch.zeros(len(boxes), 1), boxes * IMAGE], dim=1)
    summed = sum(
        F.conv2d(
            roi_align(level, rois, ROI, spatial_scale=1 / stride, sampling_ratio=2, aligned=True),
            spi_weight(weights, f"roi_align.pconvs.{index}.weight"),
            spi_weight(weights, f"roi_align.pconvs.{index}.bias"),
            padding=1,
        )
        for index, (level, stride) in enumerate(zip(levels, STRIDES, strict=True))
    )
    flat = F.linear(
        F.relu(summed).flatten(1),
        spi_weight(weights, "roi_align.flatten_linear.weight"),
        spi_weight(weights, "roi_align.flatten_linear.bias"),
    )

    def pos(index):
        return spi_weight(weights, f"roi_align.pos_embedd.{index}.weight"), spi_weight(
            weights, f"roi_align.pos_embedd.{index}.bias"
        )

    position = F.relu(F.linear(boxes, *pos(0)))
    position = F.layer_norm(position, position.shape[-1:], *pos(2))
    position = F.relu(F.linear(position, *pos(3)))
    position = F.layer_norm(position, position.shape[-1:], *pos(5))
    return F.linear(
        flat + position,
        spi_weight(weights, "roi_align.updims.weight"),
        spi_weight(weights, "roi_align.updims.bias"),
    )


def reference_forward(release, pixel_values, input_ids, boxes):
    """Image tokens, region tokens and logits as GPT4RoI computes them from the merged weights."""
    weights = release.merged
    with torch.no_grad():
        hidden_states = release.clip_model.vision_model(pixel_values, output_hidden_states=True).hidden_states
        image_tokens = F.linear(
            hidden_states[-2][:, 1:], weights["model.mm_projector.weight"], weights["model.mm_projector.bias"]
        )
        region_tokens = reference_region_tokens(weights, hidden_states, boxes)
        embeds = weights["model.embed_tokens.weight"][input_ids].clone()
        ids = release.token_ids
        embeds[input_ids == ids["<im_patch>"]] = image_tokens.reshape(-1, image_tokens.shape[-1])
        embeds[input_ids == ids["<bbox>"]] = region_tokens  # the k-th <bbox> gets the k-th box
        llama = LlamaForCausalLM(llama_config(weights["model.embed_tokens.weight"].shape[0]))
        llama.load_state_dict(
            {
                name: value
                for name, value in weights.items()
                if "spi_module" not in name and "mm_projector" not in name
            }
        )
        logits = llama.eval()(inputs_embeds=embeds).logits
    return image_tokens[0], region_tokens, logits


def prompt_ids(release):
    """A GPT4RoI-shaped prompt built from the release's own token table (not from the converted config)."""
    ids = release.token_ids

    def text(count, start):
        return [3 + (start + step) % 200 for step in range(count)]

    image = [ids["<im_start>"], *[ids["<im_patch>"]] * 256, ids["<im_end>"]]
    bbox = ids["<bbox>"]
    row = [1, *text(12, 0), *image, *text(9, 40), bbox, *text(5, 70), bbox, *text(4, 90), bbox, *text(6, 120)]
    return torch.tensor([row])


# tests ----------------------------------------------------------------------------------------------------
def test_converted_model_reproduces_gpt4roi_forward_pass(release, converted):
    out, _ = converted
    model, _ = load_pretrained(out)
    torch.manual_seed(0)
    pixel_values = torch.randn(1, 3, IMAGE, IMAGE)
    input_ids = prompt_ids(release)
    expected_image, expected_regions, expected_logits = reference_forward(
        release, pixel_values, input_ids, BOXES
    )

    with torch.no_grad():
        features = model.get_image_features(pixel_values)
        regions = model.get_region_features(features.pyramid, [BOXES])
        logits = model(input_ids, pixel_values=pixel_values, boxes=[BOXES]).logits

    torch.testing.assert_close(features.tokens[0], expected_image, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(regions, expected_regions, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits, expected_logits, atol=1e-4, rtol=1e-4)
    # the comparison has teeth: the three regions differ, and the logits depend on them
    assert (expected_regions[0] - expected_regions[2]).abs().max() > 0.1
    swapped = expected_regions[[2, 1, 0]]
    assert (swapped - regions).abs().max() > 0.1


def test_a_question_about_drawn_boxes_reproduces_gpt4roi_end_to_end(release, converted):
    """Image, drawn boxes and question in, logits out: our processor and model against GPT4RoI's whole path
    (its prompt, its tokenizer, its demo's preprocessing, its positional boxes, its forward pass)."""
    out, _ = converted
    model, processor = load_pretrained(out)
    image, boxes = noise_image(320, 200, seed=11), BOXES[:2].tolist()
    turns = [("user", "Is <region2> left of <region1>?")]
    expected_ids = slow_tokenize(release.sentencepiece, release.token_ids, official_prompt(turns))
    _, _, expected_logits = reference_forward(
        release, official_pixel_values(image)[None], torch.tensor([expected_ids]), torch.tensor(boxes)
    )

    encoded = processor.encode(turns, len(boxes), generation=True)
    assert encoded.input_ids == expected_ids
    with torch.no_grad():
        logits = model(
            torch.tensor([encoded.input_ids]),
            pixel_values=processor.pixel_values(image)[None],
            boxes=[check_boxes(boxes)[encoded.box_order]],
        ).logits
    torch.testing.assert_close(logits, expected_logits, atol=1e-4, rtol=1e-4)


def test_converted_config_tokenizer_and_template(release, converted):
    out, summary = converted
    model, processor = load_pretrained(out)
    config, ids = model.config, release.token_ids
    assert (config.image_patch_token_id, config.bbox_token_id) == (ids["<im_patch>"], ids["<bbox>"])
    assert (config.image_start_token_id, config.image_end_token_id) == (ids["<im_start>"], ids["<im_end>"])
    assert processor.tokenizer.pad_token == "[PAD]" and processor.tokenizer.pad_token_id == ids["[PAD]"]
    assert config.text_config.vocab_size == release.base_vocab + 6
    assert (config.template, config.stop_strings) == ("gpt4roi_v0", ["###"])
    assert (config.vision_feature_layer, config.region_feature_layers) == (-2, REGION_LAYERS)
    assert (config.region_embed_dim, config.region_fusion_rounds, config.roi_output_size) == (
        CLIP_WIDTH,
        ROUNDS,
        ROI,
    )
    # GPT4RoI's inputs, and its demo's sampling settings for model.generate (our paths decode greedily)
    assert (config.tokenization, config.image_resize, config.region_binding) == (
        "split_at_added_tokens",
        "shortest_edge_then_stretch",
        "by_position",
    )
    generation = model.generation_config
    assert (generation.do_sample, generation.temperature, generation.max_new_tokens) == (True, 0.2, 1024)
    card = json.loads((out / "card.json").read_text())
    assert card["official_generation"] == {
        "do_sample": True,
        "temperature": 0.2,
        "max_new_tokens": 1024,
        "stop_strings": ["###"],
    }
    assert card["base_check"] == summary["base_check"] and card["inputs"]["region_binding"] == "by_position"

    encoded = processor.encode([("user", "What is <region1> doing?")], 1, generation=True)
    text = processor.tokenizer.decode(encoded.input_ids)
    assert encoded.input_ids[0] == 1  # LLaMA's BOS
    assert encoded.input_ids.count(ids["<im_patch>"]) == 256 and encoded.input_ids.count(ids["<bbox>"]) == 1
    # no space is encoded before an added token, as GPT4RoI's tokenizer did (test_gpt4roi_inputs.py: the ids)
    assert "\n\n### Human: The<im_start>" in text and text.endswith("What is region1<bbox> doing?\n### ")

    # every tensor is accounted for: LLaMA + projector + region encoder from the delta, the tower from CLIP
    assert summary["dropped"] == [f"model.layers.{layer}.self_attn.rotary_emb.inv_freq" for layer in range(2)]
    parameters = summary["parameters"]
    assert parameters["language_model"] == sum(
        value.numel()
        for name, value in release.merged.items()
        if "spi_module" not in name and "mm_projector" not in name
    )
    assert parameters["region_encoder"] == sum(
        v.numel() for n, v in release.merged.items() if "spi_module" in n
    )
    assert parameters["vision_tower"] == sum(p.numel() for p in release.clip_model.vision_model.parameters())


def test_converted_model_generates_through_the_template(converted):
    out, _ = converted
    model, processor = load_pretrained(out)
    image = Image.new("RGB", (300, 200), "teal")
    answer = generate_answer(
        model,
        processor,
        image,
        [[0.1, 0.1, 0.5, 0.6]],
        "What is <region1>?",
        GenerationOptions(max_new_tokens=3),
    )
    assert 1 <= len(answer.token_ids) <= 3 and answer.score <= 0


def test_delta_names_map_to_our_modules():
    assert (
        our_name("model.spi_module.mlvl_fuse.fuse_convs.4.gn.bias")
        == "region_encoder.fusion.rounds.4.norm.bias"
    )
    assert our_name("model.spi_module.roi_align.pconvs.3.weight") == "region_encoder.level_convs.3.weight"
    assert our_name("model.spi_module.roi_align.updims.weight") == "region_encoder.project.weight"
    assert our_name("model.spi_module.roi_align.pos_embedd.5.bias") == "region_encoder.position_mlp.5.bias"
    assert (
        our_name("model.layers.31.mlp.down_proj.weight")
        == "language_model.model.layers.31.mlp.down_proj.weight"
    )
    assert our_name("lm_head.weight") == "language_model.lm_head.weight"
    assert our_name("model.vision_tower.weight") is None


def test_safetensors_base_and_sharded_output_give_the_same_weights(release, converted, tmp_path):
    other = write_gpt4roi_release(tmp_path / "release", base_format="safetensors")
    limit = 1_000_000
    summary = convert_gpt4roi(
        other.delta, other.base, other.clip, tmp_path / "out", dtype="float32", max_shard_bytes=limit
    )
    assert len(summary["files"]) > 2 and (tmp_path / "out" / "model.safetensors.index.json").exists()
    largest = 4 * max(value.numel() for value in release.merged.values())
    assert summary["peak_buffered_bytes"] <= limit + largest

    reference_dir, _ = converted
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())["weight_map"]
    with safe_open(reference_dir / "model.safetensors", "pt") as reference:
        assert sorted(index) == sorted(reference.keys())
        for name, file in index.items():
            with safe_open(tmp_path / "out" / file, "pt") as shard:
                assert torch.equal(shard.get_tensor(name), reference.get_tensor(name)), name
    model, _ = load_pretrained(tmp_path / "out")
    assert model.config.text_config.vocab_size == release.base_vocab + 6


def test_float16_output_halves_the_bytes(release, converted, tmp_path):
    summary = convert_gpt4roi(release.delta, release.base, release.clip, tmp_path / "fp16")
    assert summary["dtype"] == "float16" and summary["bytes"] * 2 == converted[1]["bytes"]
    model, _ = load_pretrained(tmp_path / "fp16", dtype=torch.float16)
    assert model.language_model.lm_head.weight.dtype == torch.float16


# bad input ------------------------------------------------------------------------------------------------
def copy_release(release, tmp_path):
    root = tmp_path / "copy"
    for directory in (release.delta, release.base, release.clip):
        shutil.copytree(directory, root / directory.name)
    return root / release.delta.name, root / release.base.name, root / release.clip.name


def rewrite_bin(path, change):
    state = torch.load(path, weights_only=True)
    change(state)
    torch.save(state, path)
    index = path.parent / "pytorch_model.bin.index.json"
    weight_map = json.loads(index.read_text())["weight_map"]
    weight_map = {name: file for name, file in weight_map.items() if file != path.name} | dict.fromkeys(
        state, path.name
    )
    index.write_text(json.dumps({"weight_map": weight_map}))


def break_missing_shard(delta, base, clip):
    (delta / "pytorch_model-00002-of-00002.bin").unlink()


def break_base_shape(delta, base, clip):
    rewrite_bin(
        base / "pytorch_model-00002-of-00002.bin",
        lambda state: state.update({"model.norm.weight": torch.ones(7)}),
    )


def break_unknown_tensor(delta, base, clip):
    rewrite_bin(
        delta / "pytorch_model-00002-of-00002.bin",
        lambda state: state.update({"model.spi_module.roi_align.extra_head.weight": torch.ones(3)}),
    )


def break_missing_tensor(delta, base, clip):
    rewrite_bin(
        delta / "pytorch_model-00002-of-00002.bin",
        lambda state: state.pop("model.spi_module.roi_align.updims.bias"),
    )


def break_base_lacks_tensor(delta, base, clip):
    rewrite_bin(base / "pytorch_model-00002-of-00002.bin", lambda state: state.pop("model.norm.weight"))


def break_added_tokens(delta, base, clip):
    (delta / "added_tokens.json").unlink()


def break_added_token_ids(delta, base, clip):
    added = json.loads((delta / "added_tokens.json").read_text())
    added["<bbox>"], added["<point>"] = added["<point>"], added["<bbox>"]
    (delta / "added_tokens.json").write_text(json.dumps(added))


def break_clip_resolution(delta, base, clip):
    shutil.rmtree(clip)
    clip.mkdir()
    write_clip(clip, image_size=112)


def break_config(delta, base, clip):
    (delta / "config.json").unlink()


def break_tokenizer_prefix(delta, base, clip):
    tokenizer = json.loads((delta / "tokenizer.json").read_text())
    tokenizer["normalizer"] = {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}
    (delta / "tokenizer.json").write_text(json.dumps(tokenizer))


def break_base_version(delta, base, clip):
    config = json.loads((base / "config.json").read_text())
    config.update(rms_norm_eps=1e-5, max_position_embeddings=4096)  # what LLaMA-2's conversions say
    (base / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    "damage, message",
    [
        (break_missing_shard, "pytorch_model-00002-of-00002.bin, listed in"),
        (break_base_shape, "shape mismatch for model.norm.weight: --delta has [32], --base has [7]"),
        (break_unknown_tensor, "does not know: 'model.spi_module.roi_align.extra_head.weight'"),
        (break_missing_tensor, "no source for: region_encoder.project.bias"),
        (break_base_lacks_tensor, "--base has no 'model.norm.weight'"),
        (break_added_tokens, "has no added_tokens.json"),
        (break_added_token_ids, "added_tokens.json says"),
        (break_clip_resolution, "8x8 patch grid; GPT4RoI needs 16x16"),
        (break_config, "has no config.json"),
        (break_tokenizer_prefix, "does not prefix a piece with '▁'"),
        (break_base_version, "--base config.json says rms_norm_eps 1e-05, the delta's 1e-06"),
    ],
)
def test_bad_checkpoints_fail_with_a_clear_message(release, tmp_path, damage, message):
    delta, base, clip = copy_release(release, tmp_path)
    damage(delta, base, clip)
    with pytest.raises(CheckpointError) as error:
        convert_gpt4roi(delta, base, clip, tmp_path / "out", dtype="float32")
    assert message in str(error.value)
    assert not (tmp_path / "out").exists()  # nothing half-written
    assert not [path for path in tmp_path.iterdir() if path.name.startswith(".out")]


def test_the_base_is_verified_against_the_published_checksums(release, converted, tmp_path, monkeypatch):
    _, summary = converted
    assert summary["base_check"]["config"].startswith("agrees with the delta's config.json on rms_norm_eps")
    assert summary["base_check"]["weights"].startswith(
        "not verified: pytorch_model-00001-of-00002.bin has sha256"
    )

    known = {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in release.base.glob("*.bin")}
    monkeypatch.setattr(llama_base, "LLAMA1_7B_SHA256", known)
    verified = convert_gpt4roi(
        release.delta, release.base, release.clip, tmp_path / "verified", dtype="float32"
    )
    assert verified["base_check"]["weights"].startswith("verified")

    other = write_gpt4roi_release(tmp_path / "safetensors", base_format="safetensors")
    unverifiable = convert_gpt4roi(other.delta, other.base, other.clip, tmp_path / "other", dtype="float32")
    assert "not in the two shards of the standard conversion" in unverifiable["base_check"]["weights"]


def test_cli_converts_and_reports_errors(release, tmp_path, capsys):
    arguments = ["--delta", str(release.delta), "--base", str(release.base), "--clip", str(release.clip)]
    assert (
        cli_main(["convert-gpt4roi", *arguments, "--out", str(tmp_path / "out"), "--dtype", "float32"]) == 0
    )
    printed = json.loads(capsys.readouterr().out)
    assert printed["parameters"]["total"] > 0 and (tmp_path / "out" / "config.json").exists()

    assert cli_main(["convert-gpt4roi", *arguments, "--out", str(tmp_path / "out")]) == 2
    assert "already exists and is not an empty directory" in capsys.readouterr().err
