"""`python -m tinyreason.tokenizer compare`: bytes and characters per token of every vocabulary
option on the validation text of a data config (English and Chinese apart)."""

from __future__ import annotations

import argparse
import logging

from transformers import PreTrainedTokenizerFast

from tinyreason import errors
from tinyreason.compose import compose
from tinyreason.data.sources import language_of
from tinyreason.tokenizer.build import TokenizerConfig, load_or_train
from tinyreason.training.run_config import RunConfig

PACKAGED = [
    TokenizerConfig(kind="deepseek_v4"),
    TokenizerConfig(kind="qwen", variant="qwen2.5"),
    TokenizerConfig(kind="qwen", variant="qwen3.6"),
    TokenizerConfig(kind="cl100k"),
]


def option_name(config: TokenizerConfig) -> str:
    if config.kind == "bpe":
        return f"bpe {config.vocab_size}"
    return {"qwen": f"qwen {config.variant}", "hf": f"hf {config.path}"}.get(
        config.kind, config.kind
    )


def compression(tokenizer: PreTrainedTokenizerFast, texts: list[str]) -> dict[str, float]:
    """UTF-8 bytes and characters per token of plain texts (no special tokens)."""
    if not texts:
        return {"bytes_per_token": float("nan"), "chars_per_token": float("nan")}
    num_tokens = sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])
    num_bytes = sum(len(t.encode("utf-8")) for t in texts)
    return {
        "bytes_per_token": num_bytes / num_tokens,
        "chars_per_token": sum(len(t) for t in texts) / num_tokens,
    }


def compare(cfg, bpe_sizes: list[int]) -> list[dict]:
    """One row per tokenizer option: vocabulary size and compression of the corpus' English and
    Chinese validation text. `cfg` is a composed train config (its data, cache and tokenizer)."""
    run = RunConfig.from_hydra(cfg)
    corpus = run.data.corpus
    by_lang: dict[str, list[str]] = {"en": [], "zh": []}
    for text in corpus.texts("validation"):
        by_lang[language_of(text)].append(text)
    chosen = run.tokenizer
    configs = [TokenizerConfig(kind="bpe", vocab_size=v, digits=chosen.digits) for v in bpe_sizes]
    configs += PACKAGED + ([chosen] if chosen.kind == "hf" else [])
    rows = []
    for config in configs:
        tokenizer, _ = load_or_train(
            config, cfg.cache_dir, corpus.fingerprint, corpus.tokenizer_texts
        )
        row = {"option": option_name(config), "vocab": len(tokenizer)}
        for lang, texts in by_lang.items():
            for key, value in compression(tokenizer, texts).items():
                row[f"{lang}_{key}"] = value
        rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    head = "| option | vocab | en bytes/token | en chars/token | zh bytes/token | zh chars/token |"
    lines = [head, "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        values = [r[f"{lang}_{k}_per_token"] for lang in ("en", "zh") for k in ("bytes", "chars")]
        lines.append(
            f"| {r['option']} | {r['vocab']:,} | " + " | ".join(f"{v:.2f}" for v in values) + " |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """`python -m tinyreason.tokenizer compare [--bpe-sizes 1024,4096] [hydra overrides]`."""
    parser = argparse.ArgumentParser(prog="python -m tinyreason.tokenizer")
    parser.add_argument("command", choices=["compare"])
    parser.add_argument(
        "--bpe-sizes", default=None, help="comma-separated; default tokenizer.vocab_size"
    )
    parser.add_argument("overrides", nargs="*", help="e.g. data=text_files data.paths=[a.txt]")
    args = parser.parse_intermixed_args(argv)
    errors.run(lambda: _compare(args))


def _compare(args: argparse.Namespace) -> None:
    cfg = compose("train", args.overrides)
    sizes = args.bpe_sizes or str(cfg.tokenizer.get("vocab_size", 4096))
    logging.basicConfig(level=logging.WARNING)
    rows = compare(cfg, [int(s) for s in sizes.split(",")])
    print(f"validation text of data={cfg.data.name} (cache {cfg.cache_dir})")
    print(format_table(rows))


if __name__ == "__main__":
    main()
