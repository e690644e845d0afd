"""`roi-model init`: a region-LLM from a local vision model and a local causal LM of each family.

Tiny Llama, Qwen2 and Mistral models (built from configs, saved as transformers saves them) and
CLIP / SigLIP towers in three on-disk layouts. The new model must carry the pretrained weights
unchanged, answer text-only inputs exactly as the LM does, add the image and box tokens, and be
trainable.
"""

from __future__ import annotations

import json

import pytest
import torch
from fake_checkpoints import llama_tokenizer, write_clip
from PIL import Image
from safetensors import safe_open
from tiny_models import training_batch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from roi_model.cli import main as cli_main
from roi_model.configuration import SPECIAL_TOKENS
from roi_model.convert import CheckpointError, init_from_base
from roi_model.convert.init_from_base import region_layers_for
from roi_model.loading import load_pretrained

# A small region encoder: the defaults are GPT4RoI's 1024-wide one.
SMALL_REGION = {
    "region_embed_dim": 64,
    "region_fusion_rounds": 2,
    "roi_output_size": 7,
    "region_hidden_size": 32,
    "region_position_hidden": 16,
}
CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
NO_SYSTEM_CHAT = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ raise_exception('system messages are not supported') }}"
    "{% elif message['role'] == 'user' %}[INST] {{ message['content'] }} [/INST]"
    "{% else %}{{ message['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)
WORDS = ["describe", "region", "the", "a", "what", "is", "of", "provides", "an", "overview", "picture"]
WORDS += ["red", "blue", "circle", "square", ".", ",", "?"]


def chatml_tokenizer() -> PreTrainedTokenizerFast:
    """Qwen2's kind: no BOS, ChatML markers as special tokens, the end of turn as EOS."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {
        token: index
        for index, token in enumerate([*specials, "[UNK]", "\n", "user", "assistant", "system", *WORDS])
    }
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split("\n", behavior="isolated"),
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Punctuation(),
        ]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="[UNK]",
        additional_special_tokens=specials[1:],
    )
    tokenizer.chat_template = CHATML
    return tokenizer


def write_vision(kind: str, directory):
    """Three layouts: a whole CLIPModel; a bare SiglipVisionModel (transformers 5); a pickled
    CLIPVisionModel with `vision_model.` keys and the position_ids buffer (older transformers)."""
    torch.manual_seed(1)
    tower = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, image_size=56, patch_size=14)
    if kind == "clip":
        return write_clip(directory, image_size=56).vision_model
    if kind == "siglip":
        model = SiglipVisionModel(SiglipVisionConfig(num_hidden_layers=4, **tower)).eval()
        model.save_pretrained(directory)
        return model
    config = CLIPVisionConfig(num_hidden_layers=6, **tower)
    model = CLIPVisionModel(config).eval()
    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(directory)
    state = {f"vision_model.{name}": value for name, value in model.state_dict().items()}
    state["vision_model.embeddings.position_ids"] = torch.arange(17)[None]
    torch.save(state, directory / "pytorch_model.bin")
    return model


def write_llm(family: str, directory):
    torch.manual_seed(2)
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    if family == "llama":
        tokenizer = llama_tokenizer()
        config = LlamaConfig(vocab_size=len(tokenizer), tie_word_embeddings=False, **common)
    elif family == "qwen2":
        tokenizer = chatml_tokenizer()
        # Qwen pads its embedding matrix beyond the tokenizer, and the small ones tie it to the output
        config = Qwen2Config(
            vocab_size=len(tokenizer) + 9, num_key_value_heads=2, tie_word_embeddings=True, **common
        )
    else:
        tokenizer = llama_tokenizer()
        tokenizer.chat_template = NO_SYSTEM_CHAT
        config = MistralConfig(vocab_size=len(tokenizer), num_key_value_heads=2, sliding_window=64, **common)
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return model, tokenizer


CASES = {"llama": "clip", "qwen2": "siglip", "mistral": "clip_legacy"}


@pytest.fixture(scope="module", params=list(CASES))
def initialised(request, tmp_path_factory):
    family = request.param
    root = tmp_path_factory.mktemp(family)
    vision = write_vision(CASES[family], root / "vision")
    llm, tokenizer = write_llm(family, root / "llm")
    summary = init_from_base(
        root / "vision", root / "llm", root / "out", dtype="float32", overrides=SMALL_REGION
    )
    model, processor = load_pretrained(root / "out")
    return family, vision, llm, tokenizer, summary, model, processor


def kept_rows(rows: int, summary: dict) -> list[int]:
    return [row for row in range(rows) if row not in summary["added_tokens"].values()]


def test_pretrained_weights_arrive_unchanged(initialised):
    _, vision, llm, _, summary, model, _ = initialised
    ours = model.vision_tower.model.state_dict()
    theirs = vision.state_dict()
    assert sorted(ours) == sorted(theirs)
    assert all(torch.equal(ours[name], theirs[name]) for name in theirs)

    ours = model.language_model.state_dict()
    embeddings = {"model.embed_tokens.weight", "lm_head.weight"}
    for name, value in llm.state_dict().items():
        if name in embeddings:  # every row but the new tokens' (Qwen's spare rows may hold them)
            kept = kept_rows(value.shape[0], summary)
            assert torch.equal(ours[name][kept], value[kept]), name
        else:
            assert torch.equal(ours[name], value), name
    assert summary["parameters"]["language_model"] >= sum(p.numel() for p in llm.parameters())


def test_new_tokens_are_single_tokens_with_mean_embeddings(initialised):
    _, _, llm, tokenizer, summary, model, processor = initialised
    ids = [processor.tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS]
    config = model.config
    assert ids == [
        config.image_patch_token_id,
        config.bbox_token_id,
        config.image_start_token_id,
        config.image_end_token_id,
    ]
    assert summary["added_tokens"] == dict(zip(SPECIAL_TOKENS, ids, strict=True))
    assert processor.tokenizer("<im_start><im_patch><bbox><im_end>", add_special_tokens=False).input_ids == [
        ids[2],
        ids[0],
        ids[1],
        ids[3],
    ]
    rows = model.language_model.get_input_embeddings().weight
    assert rows.shape[0] == config.text_config.vocab_size >= len(processor.tokenizer)
    expected = llm.get_input_embeddings().weight[: len(tokenizer)].mean(dim=0)
    for token_id in ids:
        torch.testing.assert_close(rows[token_id], expected)


def test_text_only_logits_equal_the_language_model(initialised):
    _, _, llm, tokenizer, summary, model, _ = initialised
    input_ids = torch.tensor([[token % len(tokenizer) for token in range(3, 40, 3)]])
    with torch.no_grad():
        expected = llm(input_ids).logits
        ours = model(input_ids).logits
    kept = kept_rows(expected.shape[-1], summary)
    torch.testing.assert_close(ours[..., kept], expected[..., kept], atol=1e-5, rtol=1e-5)


def test_template_follows_the_tokenizer(initialised):
    family, _, _, _, summary, model, processor = initialised
    config = model.config
    if family == "llama":  # no chat template: GPT4RoI's "###" conversation
        assert (config.template, config.stop_strings) == ("gpt4roi_v0", ["###"])
    else:
        assert (config.template, config.stop_strings) == ("chat", [])
    if family == "mistral":  # its template refuses a system message
        assert config.system_prompt == ""
    if family == "qwen2":
        assert model.generation_config.eos_token_id == processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
        lm = model.language_model
        assert lm.lm_head.weight.data_ptr() == lm.get_input_embeddings().weight.data_ptr()
    assert config.region_feature_layers == region_layers_for(config.vision_config.num_hidden_layers)
    assert summary["template"] == config.template


def test_model_is_ready_to_train(initialised, tmp_path):
    _, _, _, _, _, model, processor = initialised
    image = Image.new("RGB", (80, 60), "red")
    example = (
        image,
        [[0.1, 0.2, 0.6, 0.9]],
        [("user", "describe <region1> ."), ("assistant", "a red square")],
    )
    batch = training_batch(processor, tmp_path, [example])
    model.train()
    loss = model(**batch).loss
    loss.backward()
    model.eval()
    assert torch.isfinite(loss)
    assert model.region_encoder.flatten_linear.weight.grad.abs().sum() > 0
    assert model.mm_projector.weight.grad.abs().sum() > 0
    model.zero_grad()


def test_region_layers_follow_gpt4roi_and_shrink_for_shallow_towers():
    assert region_layers_for(24) == [-11, -8, -5, -2]
    assert region_layers_for(12) == [-11, -8, -5, -2]
    assert region_layers_for(9) == [-8, -6, -4, -2]
    assert region_layers_for(6) == [-5, -4, -3, -2]
    assert region_layers_for(4) == [-5, -4, -3, -2]
    with pytest.raises(CheckpointError, match="at least 4"):
        region_layers_for(3)


def test_cli_init_with_settings_and_dtype(tmp_path, capsys):
    write_vision("siglip", tmp_path / "vision")
    write_llm("llama", tmp_path / "llm")
    settings = [f"--set={field}={value}" for field, value in SMALL_REGION.items()]
    arguments = ["init", "--vision", str(tmp_path / "vision"), "--llm", str(tmp_path / "llm")]
    assert (
        cli_main(
            [
                *arguments,
                "--out",
                str(tmp_path / "out"),
                "--dtype",
                "bfloat16",
                "--set",
                "template=chat",
                *settings,
            ]
        )
        == 2
    )
    assert "template 'chat' needs a tokenizer with a chat template" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()

    assert cli_main([*arguments, "--out", str(tmp_path / "out"), "--dtype", "bfloat16", *settings]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["dtype"] == "bfloat16" and summary["vision"] == "siglip_vision_model"
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as weights:
        assert weights.get_tensor("region_encoder.project.weight").dtype == torch.bfloat16
        assert weights.get_tensor("region_encoder.project.weight").shape == (32, 32)

    assert cli_main([*arguments, "--out", str(tmp_path / "other"), "--set", "region_width=3"]) == 2
    assert "cannot set region_width" in capsys.readouterr().err
    assert (
        cli_main(
            [
                "init",
                "--vision",
                str(tmp_path / "llm"),
                "--llm",
                str(tmp_path / "llm"),
                "--out",
                str(tmp_path / "x"),
            ]
        )
        == 2
    )
    assert "expected CLIP or SigLIP" in capsys.readouterr().err
