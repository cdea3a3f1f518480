"""Text-file corpora, the shard cache (reuse, the lock between parallel jobs, refusal of shards
made with another tokenizer), the byte counts in the manifest and the byte budget."""

import gzip
import io
import json
import multiprocessing
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from omegaconf import open_dict

from tinyreason import tokenizer as tk
from tinyreason.data import shards
from tinyreason.data.sources import TextFilesConfig, TextFilesCorpus, build_corpus, language_of
from tinyreason.training.run_config import RunConfig

EN = [f"Line {i}: the quick brown fox jumps over {i * 7} lazy dogs." for i in range(300)]
ZH = [f"第{i}行：小明买了{i}个苹果，每个12元。" for i in range(300)]


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    (root / "en.txt").write_text("\r\n".join(EN), encoding="utf-8")  # CRLF becomes "\n"
    jsonl = "\n".join(
        json.dumps({"text": t, "id": i}, ensure_ascii=False) for i, t in enumerate(ZH)
    )
    (root / "zh.jsonl.gz").write_bytes(gzip.compress(jsonl.encode()))
    buffer = io.BytesIO()
    pq.write_table(pa.table({"text": EN[:50] + ZH[:50]}), buffer)
    (root / "mix.parquet.zst").write_bytes(zstandard.ZstdCompressor().compress(buffer.getvalue()))
    return root


def corpus_of(text_dir, *names, **kw) -> TextFilesCorpus:
    return TextFilesCorpus(TextFilesConfig(paths=tuple(str(text_dir / n) for n in names), **kw))


def test_text_files_read_every_format_and_split_disjointly(text_dir):
    corpus = corpus_of(
        text_dir, "en.txt", "zh.jsonl.gz", "mix.parquet.zst", doc_chars=200, val_fraction=0.2
    )
    train, val = corpus.texts("train"), corpus.texts("validation")
    assert val and train and not set(train) & set(val)
    everything = "\n".join(train + val)
    assert "\r" not in everything and EN[299] in everything and ZH[299] in everything
    assert sum(t in set(train + val) for t in ZH) == 300  # one jsonl record = one document
    assert {language_of(t) for t in train[:20]} == {"en", "zh"}, "files interleaved by hash order"
    docs = corpus.documents("validation")
    assert all(d.startswith(tk.BOS) and d.endswith(tk.EOS) for d in docs)


def test_text_files_fingerprint_follows_content(text_dir, tmp_path):
    a = corpus_of(text_dir, "en.txt").fingerprint
    assert a == corpus_of(text_dir, "en.txt").fingerprint
    (tmp_path / "en.txt").write_text("\n".join(EN[:-1]))
    assert corpus_of(tmp_path, "en.txt").fingerprint != a


def test_text_files_bad_input(text_dir, tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        _ = corpus_of(text_dir, "absent.txt").fingerprint
    with pytest.raises(ValueError, match=r"\.csv"):
        build_corpus("text_files", {"paths": ["a.csv"]})
    with pytest.raises(ValueError, match="data.paths is empty"):
        build_corpus("text_files", {"paths": []})
    (tmp_path / "bad.jsonl").write_text('{"body": "no text key"}\n')
    with pytest.raises(ValueError, match="text_key='text'"):
        corpus_of(tmp_path, "bad.jsonl").texts("train")


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory):
    """Two different tiny BPE tokenizers saved as folders."""
    root = tmp_path_factory.mktemp("toks")
    folders = []
    for size in (300, 320):
        tok = tk.train_bpe(iter(EN + ZH), tk.TokenizerConfig(vocab_size=size))
        tok.save_pretrained(root / str(size))
        folders.append(root / str(size))
    return folders


def test_manifest_counts_the_bytes_bpb_divides_by(text_dir, tokenizer_dirs, tmp_path):
    corpus = corpus_of(text_dir, "en.txt", "zh.jsonl.gz", doc_chars=300)
    folder = tokenizer_dirs[0]
    manifest = shards.prepare(tmp_path, "c", "t", folder, 300, corpus.documents)
    tok = tk.load(folder)
    lengths = tk.token_byte_lengths(tok)
    for split in shards.SPLITS:
        docs = corpus.documents(split)
        ids = [i for d in tok(docs, add_special_tokens=False)["input_ids"] for i in d]
        stats = manifest["splits"][split]
        assert stats["tokens"] == len(ids)
        assert (
            stats["bytes"]
            == int(lengths[ids].sum())
            == sum(len(t.encode()) for t in corpus.texts(split))
        )
        assert stats["chars"] == sum(len(t) for t in corpus.texts(split))
    assert shards.bytes_per_token(manifest) == pytest.approx(
        manifest["splits"]["train"]["bytes"] / manifest["splits"]["train"]["tokens"]
    )


def _prepare_job(args, log):
    """One sweep job: records each split it tokenizes, sleeping long enough for the other job to
    reach the lock, then writes the manifest it got."""
    data_dir, text_dir, tokenizer_dir, out = args
    corpus = corpus_of(text_dir, "en.txt", doc_chars=300)

    def slow_documents(split):
        with open(log, "a") as f:
            f.write(split + "\n")
        time.sleep(0.5)
        return corpus.documents(split)

    manifest = shards.prepare(data_dir, "c", "t", tokenizer_dir, 300, slow_documents)
    out.write_text(json.dumps(manifest))


def test_parallel_jobs_tokenize_once_and_share(text_dir, tokenizer_dirs, tmp_path):
    log = tmp_path / "calls.txt"
    fork = multiprocessing.get_context(
        "fork"
    )  # litdata's optimize() needs a main thread: processes
    jobs = [
        fork.Process(
            target=_prepare_job,
            args=((tmp_path, text_dir, tokenizer_dirs[0], tmp_path / f"{i}.json"), log),
        )
        for i in range(2)
    ]
    for job in jobs:
        job.start()
    for job in jobs:
        job.join(timeout=120)
    assert [job.exitcode for job in jobs] == [0, 0]
    assert sorted(log.read_text().split()) == ["train", "validation"], (
        "the second job must wait, then reuse"
    )
    first, second = (json.loads((tmp_path / f"{i}.json").read_text()) for i in range(2))
    assert first == second and first["splits"]["train"]["tokens"] > 0
    stamp = (tmp_path / "c" / "t" / shards.MANIFEST).stat().st_mtime_ns
    again = shards.prepare(tmp_path, "c", "t", tokenizer_dirs[0], 300, lambda split: 1 / 0)
    assert again == first, "a finished cache is read, never rebuilt"
    assert (tmp_path / "c" / "t" / shards.MANIFEST).stat().st_mtime_ns == stamp


def test_shards_of_another_tokenizer_are_refused(text_dir, tokenizer_dirs, tmp_path):
    corpus = corpus_of(text_dir, "en.txt", doc_chars=300)
    shards.prepare(tmp_path, "c", "t", tokenizer_dirs[0], 300, corpus.documents)
    # same folder name, different tokenizer.json (e.g. retrained by another library version)
    with pytest.raises(ValueError, match="tokenizer_sha256"):
        shards.prepare(tmp_path, "c", "t", tokenizer_dirs[1], 300, corpus.documents)
    with pytest.raises(ValueError, match="vocab_size"):
        shards.prepare(tmp_path, "c", "t", tokenizer_dirs[0], 320, corpus.documents)


def test_steps_follow_bytes_per_token():
    manifest = {"splits": {"train": {"bytes": 1000, "tokens": 400}}}  # 2.5 bytes/token
    # 1e6 bytes / (2.5 bytes/token * 1000 tokens/step) = 400 steps
    assert shards.steps_for_bytes(manifest, 1_000_000, 1000, multiple=4) == 400
    assert shards.steps_for_bytes(manifest, 1_010_000, 1000, multiple=4) == 404  # rounded to 4
    assert shards.steps_for_bytes(manifest, 10, 1000, multiple=4) == 4  # at least one per eval


# the points of experiments/vocab_scaling/README.md: row name -> overrides on experiment=vocab_scaling
VOCAB_POINTS = {
    **{
        f"bpe_{n // 1024}k": [f"tokenizer.vocab_size={n}"]
        for n in (1024, 2048, 4096, 8192, 16384, 32768)
    },
    "deepseek_v4": ["tokenizer=deepseek_v4"],
    "qwen": ["tokenizer=qwen", "tokenizer.variant=qwen2.5"],
    "cl100k": ["tokenizer=cl100k"],
}


@pytest.mark.parametrize("vocab", list(VOCAB_POINTS))
def test_vocab_scaling_points_compose_with_one_model_and_budget(make_cfg, vocab):
    cfg = make_cfg("experiment=vocab_scaling", *VOCAB_POINTS[vocab], "data.batch_size=4")
    run = RunConfig.from_hydra(cfg)
    assert run.tokenizer.kind == ("bpe" if vocab.startswith("bpe") else vocab)
    assert cfg.model.name == "dense" and run.budget.train_bytes > 0
    with open_dict(cfg):
        cfg.data.seq_len = 100
    run = RunConfig.from_hydra(cfg)
    budgeted = run.for_manifest({"splits": {"train": {"bytes": 5000, "tokens": 2000}}})
    evals = run.budget.num_evals
    steps = round(run.budget.train_bytes / (2.5 * 400) / evals) * evals
    assert budgeted.trainer.max_steps == budgeted.optim.total_steps == steps
    assert budgeted.trainer.val_check_interval * evals == steps
    assert cfg.trainer.max_steps == run.trainer.max_steps  # the Hydra config is not edited


def test_a_small_text_corpus_always_has_a_validation_document(tmp_path):
    """Two documents and a 2% share would leave validation empty (step 0 then crashes deep in
    the loader): the document of the lowest hash goes there instead; one document is refused."""
    two = tmp_path / "two.jsonl"
    two.write_text("".join(json.dumps({"text": f"document {i} " * 20}) + "\n" for i in range(2)))
    corpus = TextFilesCorpus(TextFilesConfig(paths=(str(two),), val_fraction=0.02))
    train, val = corpus.texts("train"), corpus.texts("validation")
    assert len(train) == len(val) == 1 and set(train + val) == {
        f"document {i} " * 20 for i in range(2)
    }
    assert corpus.texts("validation") == val  # deterministic
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps({"text": "only this"}) + "\n")
    with pytest.raises(ValueError, match="at least two.*val_fraction"):
        TextFilesCorpus(TextFilesConfig(paths=(str(one),))).texts("train")
