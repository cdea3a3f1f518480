"""The special tokens and the one chat template every tokenizer of tinyreason shares (a leaf:
no imports from the rest of the project)."""

from __future__ import annotations

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
ROLES = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
# Ids 0.. in this order for every tokenizer we train. The think tags are "added" but not
# "special": they survive `decode(skip_special_tokens=True)`, since they are part of an answer.
SPECIAL_TOKENS = [BOS, EOS, PAD, *ROLES.values()]
ADDED_TOKENS = [THINK_OPEN, THINK_CLOSE]

# One chat template for every vocabulary. A turn is its role token followed by the content; an
# assistant turn ends with eos. Generation prompts end in "<|assistant|>".
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def chat_document(question: str, answer: str, system: str | None = None) -> str:
    """The text of one conversation exactly as `apply_chat_template` renders it (ends with eos)."""
    turns = ([ROLES["system"] + system] if system else []) + [
        ROLES["user"] + question,
        ROLES["assistant"] + answer + EOS,
    ]
    return BOS + "".join(turns)
