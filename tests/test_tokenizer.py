"""The trained BPE: round trips, special tokens, chat template, byte lengths for BPB, cache reuse."""

import pytest

from tinyreason import tokenizers as tk

TEXTS = [
    "Tom buys 3 apples at 12 dollars each. How much does he pay?",
    "小明买了3个苹果，每个12元。他一共付了多少钱？",
    "<think>\nunits: 7 + 5 = 12, write 2 carry 1\n</think>\nAnswer: 36",
    "答案：36",
] * 50


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    cfg = tk.TokenizerConfig(vocab_size=400)
    calls = []

    def texts():
        calls.append(1)
        return iter(TEXTS)

    cache = tmp_path_factory.mktemp("tok")
    tok, folder = tk.load_or_train(cfg, cache, "corpus-x", texts)
    again, folder2 = tk.load_or_train(cfg, cache, "corpus-x", texts)
    assert folder == folder2 and len(calls) == 1, "second call must reuse the cached tokenizer"
    return tok


@pytest.mark.parametrize(
    "text",
    [
        "Alice has 1234 marbles and gives away 567.",
        "一辆车每小时行驶60千米，3小时行驶多少千米？",
        "Mixed 中英文 text with digits 0987 and émoji 🙂.",
    ],
)
def test_round_trip_english_and_chinese(bpe, text):
    ids = bpe(text, add_special_tokens=False)["input_ids"]
    assert bpe.decode(ids) == text


def test_digits_are_split_individually(bpe):
    ids = bpe("1234", add_special_tokens=False)["input_ids"]
    assert [bpe.decode([i]) for i in ids] == ["1", "2", "3", "4"]


def test_special_and_think_tokens_are_single_ids(bpe):
    for token in tk.SPECIAL_TOKENS + tk.ADDED_TOKENS:
        ids = bpe(token, add_special_tokens=False)["input_ids"]
        assert ids == [bpe.convert_tokens_to_ids(token)]
    assert bpe.convert_tokens_to_ids(tk.BOS) == 0 and bpe.convert_tokens_to_ids(tk.EOS) == 1
    think = bpe("<think>x</think>", add_special_tokens=False)["input_ids"]
    assert bpe.decode(think, skip_special_tokens=True) == "<think>x</think>"


def test_chat_template_matches_chat_document(bpe):
    messages = [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "<think>\n2+2=4\n</think>\nAnswer: 4"},
    ]
    rendered = bpe.apply_chat_template(messages, tokenize=False)
    assert rendered == tk.chat_document("2+2?", "<think>\n2+2=4\n</think>\nAnswer: 4")
    prompt = bpe.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == tk.BOS + "<|user|>2+2?<|assistant|>"


def test_token_byte_lengths_sum_to_utf8_bytes(bpe):
    lengths = tk.token_byte_lengths(bpe)
    assert lengths.shape[0] == tk.model_vocab_size(bpe) and lengths.shape[0] % 64 == 0
    for text in ["Answer: 1234", "答案：一千二百", "🙂 ok"]:
        ids = bpe(text, add_special_tokens=False)["input_ids"]
        assert int(lengths[ids].sum()) == len(text.encode("utf-8"))
    for token in tk.SPECIAL_TOKENS + tk.ADDED_TOKENS:
        assert lengths[bpe.convert_tokens_to_ids(token)] == 0
    assert int(lengths[len(bpe) :].abs().sum()) == 0  # padding rows


def test_vocab_too_small_is_refused():
    with pytest.raises(ValueError, match="vocab_size"):
        tk.TokenizerConfig(vocab_size=200)


def test_missing_tokenizer_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="tokenizer.json"):
        tk.load(tmp_path)
