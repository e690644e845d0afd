"""The word-level tokenizer of models trained here from scratch (the demo model, `roi-model train --config`).

It is trained with `tokenizers` on the words the model must know and saved in the model directory
like any other tokenizer. Its chat template is three markers long, so that a small model spends its
few positions on the image and the question.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from .configuration import SPECIAL_TOKENS

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
