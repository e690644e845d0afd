"""GPT4RoI's input pipeline, written from its code's semantics (gpt4roi/app.py, gpt4roi/train/train.py,
transformers 4.29's slow LLaMA tokenizer), for the tests to hold ours against. Shares no code with roi_model.

- the prompt: app.py's rewrite of `<regionK>` / `<K>` into "regionK <bbox>" (a name from an earlier round
  is written plainly), the first question prefixed with "The <image> provides an overview of the
  picture.\n", `<image>` expanded to <im_start> <im_patch>x256 <im_end>, and train.py's v0 "###"
  conversation: "{system}\n\n" + "### {Human|Assistant}: {text}\n" per turn + "### ";
- the tokenizer: 4.29's PreTrainedTokenizer.tokenize splits the text at every added or special token
  (leftmost, longest first), strips the whitespace on both sides of each token that is not an AddedToken
  (the tokens GPT4RoI added with add_tokens), and encodes every piece with SentencePiece on its own;
  LlamaTokenizer prepends <s>;
- the image: CLIPImageProcessor (4.29's is PIL-based: transformers 5's CLIPImageProcessorPil) with
  do_center_crop=False, then a bilinear resize to 224x224 without antialiasing;
- the boxes: the k-th <bbox> of the prompt takes the k-th drawn box (spi_llava.py fills the masked
  positions in order).
"""

from __future__ import annotations

import re

import sentencepiece
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import CLIPImageProcessorPil

SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
IMAGE_TOKENS = 256
STRIPPED = ["[PAD]", "<im_patch>", "<bbox>", "<point>", "<im_start>", "<im_end>"]  # added as plain strings
KEPT = ["<unk>", "<s>", "</s>"]  # LlamaTokenizer's own AddedTokens (lstrip=rstrip=False)


def official_prompt(turns: list[tuple[str, str]]) -> str:
    """The text app.py hands to train.py's preprocess for a conversation whose last turn is the question."""
    seen: set[str] = set()
    conversation = []
    for index, (role, text) in enumerate(turns):
        if role == "user":
            if index == 0:
                text = "The <image> provides an overview of the picture.\n" + text
            else:  # check_input: an earlier round's name loses its brackets
                for name in re.findall(r"<region\d+>", text):
                    if name in seen:
                        text = text.replace(name, name[1:-1])
            seen |= set(re.findall(r"<region\d+>", text))
            text = re.sub(r"<region(\d+)>", r"region\g<1> <bbox>", text)
            text = re.sub(r"<(\d+)>", r"region\g<1> <bbox>", text)
        conversation.append(("Human" if role == "user" else "Assistant", text))
    image = "<im_start>" + "<im_patch>" * IMAGE_TOKENS + "<im_end>"
    prompt = SYSTEM + "\n\n"
    for speaker, text in conversation:
        prompt += "### " + speaker + ": " + text.replace("<image>", image) + "\n"
    return prompt + "### "


def slow_tokenize(model: bytes, added_ids: dict[str, int], text: str) -> list[int]:
    """transformers 4.29's slow LlamaTokenizer(text).input_ids, with GPT4RoI's added tokens."""
    processor = sentencepiece.SentencePieceProcessor(model_proto=model)
    specials = sorted(STRIPPED + KEPT, key=len, reverse=True)
    pieces: list[str] = []
    start = position = 0
    while position < len(text):  # the trie's split: leftmost match, longest at that position
        token = next((token for token in specials if text.startswith(token, position)), None)
        if token is None:
            position += 1
            continue
        pieces += [text[start:position], token]
        position = start = position + len(token)
    pieces.append(text[start:])
    for index in range(1, len(pieces), 2):
        if pieces[index] in STRIPPED:
            pieces[index - 1] = pieces[index - 1].rstrip()
            pieces[index + 1] = pieces[index + 1].lstrip()
    ids = [processor.piece_to_id("<s>")]
    for index, piece in enumerate(pieces):
        if index % 2:
            ids.append(added_ids[piece] if piece in added_ids else processor.piece_to_id(piece))
        elif piece:
            ids += processor.encode(piece)
    return ids


def official_pixel_values(image: Image.Image, size: int = 224) -> torch.Tensor:
    pixels = CLIPImageProcessorPil(size={"shortest_edge": size})(
        image.convert("RGB"), do_center_crop=False, return_tensors="pt"
    )["pixel_values"]
    return F.interpolate(pixels, size=(size, size), mode="bilinear", align_corners=False)[0]


def positional_embeddings(
    token_embeddings: torch.Tensor, input_ids: list[int], bbox_id: int, region_tokens: torch.Tensor
) -> torch.Tensor:
    """spi_llava.py's rule: the k-th <bbox> position takes the region token of the k-th drawn box."""
    embeds = token_embeddings.clone()
    positions = [index for index, token in enumerate(input_ids) if token == bbox_id]
    for k, position in enumerate(positions):
        embeds[position] = region_tokens[k]
    return embeds
