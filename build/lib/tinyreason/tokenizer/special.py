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
# assistant turn ends with eos. Generation prompts end in "<|assistant|>"; with
# `enable_thinking=False` (Qwen3's switch) the prompt also holds an empty think block, so the model
# answers at once. `{% generation %}` marks what the assistant writes (its content and eos): HF's
# `return_assistant_tokens_mask` and TRL's `assistant_only_loss` read it. With thinking on (the
# default) the text is byte for byte what `chat_document` / `chat_prompt` write.
EMPTY_THINK = THINK_OPEN + "\n\n" + THINK_CLOSE + "\n"
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|assistant|>' }}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
    "{% else %}{{ '<|' + message['role'] + '|>' + message['content'] }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}"
    "{% if enable_thinking is defined and not enable_thinking %}"
    "{{ '<think>\\n\\n</think>\\n' }}{% endif %}"
    "{% endif %}"
)


def chat_document(question: str, answer: str, system: str | None = None) -> str:
    """The text of one conversation exactly as `apply_chat_template` renders it (ends with eos)."""
    turns = ([ROLES["system"] + system] if system else []) + [
        ROLES["user"] + question,
        ROLES["assistant"] + answer + EOS,
    ]
    return BOS + "".join(turns)


def chat_prompt(question: str, system: str | None = None, thinking: bool = True) -> str:
    """The generation prompt `apply_chat_template(..., add_generation_prompt=True)` renders."""
    turns = ([ROLES["system"] + system] if system else []) + [ROLES["user"] + question]
    return BOS + "".join(turns) + ROLES["assistant"] + ("" if thinking else EMPTY_THINK)


def without_think(answer: str) -> str:
    """An assistant answer with its think block emptied (the answer line alone after it)."""
    head, sep, tail = answer.partition(THINK_CLOSE)
    if not sep or THINK_OPEN not in head:
        return answer
    return head[: head.index(THINK_OPEN)] + EMPTY_THINK + tail.removeprefix("\n")
