"""Loading for serving: dtype, attention kernel, device choice and the bitsandbytes guard."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from tiny_models import make_tiny, noise_image

from roi_model.assembly import save_pretrained
from roi_model.loading import load_pretrained, resolve_device, resolve_dtype
from roi_model.processing import check_boxes


@pytest.fixture(scope="module")
def saved():
    return make_tiny("clip")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, saved):
    directory = tmp_path_factory.mktemp("model")
    save_pretrained(*saved, directory)
    return directory


def logits_of(model, processor):
    encoded = processor.encode([("user", "describe <region1> .")], 1, generation=True)
    pixels = processor.pixel_values(noise_image(70, 50))[None].to(model.dtype)
    with torch.no_grad():
        return model(
            torch.tensor([encoded.input_ids]),
            pixel_values=pixels,
            boxes=[check_boxes([[0.1, 0.2, 0.7, 0.9]])],
        ).logits


def test_auto_on_a_cpu_machine_gives_the_saved_model(model_dir, saved, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model, processor = load_pretrained(model_dir)
    assert model.device.type == "cpu" and model.dtype == torch.float32
    assert model.language_model.config._attn_implementation == "sdpa"
    assert model.vision_tower.model.config._attn_implementation == "sdpa"
    assert not model.training
    assert torch.equal(logits_of(model, processor), logits_of(*saved))


def test_bfloat16_and_eager_attention(model_dir, saved):
    model, processor = load_pretrained(model_dir, device="cpu", dtype="bfloat16", attention="eager")
    assert (
        model.dtype == torch.bfloat16 and model.region_encoder.flatten_linear.weight.dtype == torch.bfloat16
    )
    assert model.language_model.config._attn_implementation == "eager"
    assert model.generation_config.to_dict() == saved[0].generation_config.to_dict()
    logits = logits_of(model, processor)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


def test_quantization_without_bitsandbytes_says_what_to_install(model_dir, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "bitsandbytes" else real_find_spec(name, *a),
    )
    with pytest.raises(
        ValueError, match="4bit loading needs bitsandbytes, which is not installed: pip install"
    ):
        load_pretrained(model_dir, device="cpu", quantization="4bit")


def test_quantization_needs_a_cuda_device(model_dir, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: object() if name == "bitsandbytes" else real_find_spec(name, *a),
    )
    with pytest.raises(ValueError, match="8bit loading runs on a CUDA device; the device here is cpu"):
        load_pretrained(model_dir, device="cpu", quantization="8bit")


@pytest.mark.parametrize(
    "options, message",
    [
        ({"quantization": "3bit"}, "unknown quantization '3bit'"),
        ({"attention": "fast"}, "unknown attention 'fast'"),
        ({"dtype": "int8"}, "unknown dtype 'int8'"),
    ],
)
def test_bad_options_are_named(model_dir, options, message):
    with pytest.raises(ValueError, match=message):
        load_pretrained(model_dir, device="cpu", **options)


def test_device_choice(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    with pytest.raises(ValueError, match="this machine has no CUDA device"):
        resolve_device("cuda:1")
