"""A character-level chat tokenizer built in code with `tokenizers`: no download, identical on every machine.

One token per character keeps the synthetic tasks exact (reversing a string reverses its tokens) and the
vocabulary tiny. The chat template is ChatML; `<|im_end|>` ends an assistant turn and is the EOS token.
"""

from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, EOS, BOS_TURN, UNK = "<|pad|>", "<|im_end|>", "<|im_start|>", "<|unk|>"
SPECIAL_TOKENS = [PAD, UNK, BOS_TURN, EOS]
ROLE_TOKENS = ["system", "user", "assistant"]  # one token each, so the template costs few positions
# Uppercase comes last so that the ids of the original characters did not move when it was added (for the
# self-teacher's prompt templates, e.g. "Correct solution:").
CHARACTERS = string.digits + string.ascii_lowercase + " +-*=?:;,.!()<>|/#\n" + string.ascii_uppercase

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + ROLE_TOKENS + list(CHARACTERS))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(SPECIAL_TOKENS)
    backend.add_tokens(ROLE_TOKENS)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        eos_token=EOS,
        unk_token=UNK,
        padding_side="left",
        truncation_side="left",
        chat_template=CHAT_TEMPLATE,
    )
    return tokenizer
