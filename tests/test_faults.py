"""Faults and bad input, as a user meets them: every user error exits 2 with one or two lines
naming what is wrong and how to fix it, no traceback (`tinyreason.errors`), and nothing on disk is
lost or overwritten. A few real processes prove the exit status per class (config, data,
checkpoint, export); the many value checks run in-process. Divergence, atomic and damaged
checkpoints, resume compatibility and kill -9 are tests/test_run_safety.py's."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import prepare, run_train_cli
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from tinyreason import errors
from tinyreason import tokenizer as tk
from tinyreason.compose import CONF_DIR
from tinyreason.data import shards
from tinyreason.data.sources import TextFilesConfig, TextFilesCorpus
from tinyreason.training.run_config import RunConfig


def run_cli(module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=300, cwd=cwd
    )


def assert_user_error(proc: subprocess.CompletedProcess, *phrases: str) -> str:
    """Exit 2, `error: ...` in at most two lines carrying every phrase, no traceback."""
    assert proc.returncode == errors.EXIT_CODE, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "HYDRA_FULL_ERROR" not in proc.stderr
    report = proc.stderr[proc.stderr.index("error: ") :].strip()
    assert len(report.splitlines()) <= 2, report
    for phrase in phrases:
        assert phrase in report, (phrase, report)
    return report


def snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` but Hydra's `.hydra/` (which Hydra rewrites for every
    command run in a folder) and its appended log."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and ".hydra" not in p.parts and p.suffix != ".log"
    }


# -- the rule and the report (in-process) ---------------------------------------------------------


def test_the_rule_tells_user_errors_from_bugs():
    from tinyreason.checkpoints import checkpoint_file

    with pytest.raises(ValueError) as ours:
        checkpoint_file("/nonexistent/last.ckpt")  # a ValueError raised by tinyreason
    with pytest.raises(ValueError) as library:
        json.loads("{")  # a ValueError raised inside a library: may be our bug
    assert errors.is_user_error(ours.value) and not errors.is_user_error(library.value)
    assert errors.is_user_error(errors.UserError("x"))
    assert not errors.is_user_error(RuntimeError("x")) and not errors.is_user_error(TypeError())


def test_run_reports_a_user_error_and_lets_a_bug_through(capsys, monkeypatch):
    from tinyreason.checkpoints import checkpoint_file

    monkeypatch.delenv("TINYREASON_TRACEBACK", raising=False)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    with pytest.raises(SystemExit) as exit_:
        errors.run(lambda: checkpoint_file("/nonexistent/x.ckpt"))
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err == "error: ckpt='/nonexistent/x.ckpt': no checkpoint at /nonexistent/x.ckpt\n"
    with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback
        errors.run(lambda: 1 / 0)
    assert "HYDRA_FULL_ERROR" not in os.environ, "restored after the call"
    for env in ("TINYREASON_TRACEBACK", "HYDRA_FULL_ERROR"):
        with monkeypatch.context() as m:
            m.setenv(env, "1")
            with pytest.raises(ValueError, match="no checkpoint"):  # the traceback, on request
                errors.run(lambda: checkpoint_file("/nonexistent/x.ckpt"))


@pytest.mark.parametrize(
    "override, lines",
    [
        ("model=nonexistent", ["model=nonexistent is not an option of model; allowed: dense, "]),
        (
            "trainer.nonexistent_key=1",
            [
                "trainer.nonexistent_key is not a key of trainer; allowed: accelerator, devices",
                "(to add a new key anyway: +trainer.nonexistent_key=1)",
            ],
        ),
        ("optim.lr==", ["Error parsing override 'optim.lr=='", "extraneous input '='"]),
        ("+experiment=nope", ["experiment=nope is not an option of experiment; allowed: fp8_vs"]),
    ],
)
def test_hydra_composition_errors_read_in_two_lines(override, lines):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        with pytest.raises(Exception) as err:
            compose("train", overrides=[override])
    assert errors.is_user_error(err.value)
    report = errors.message(err.value).splitlines()
    assert len(report) == len(lines)
    assert all(r.startswith(w) for r, w in zip(report, lines, strict=True)), report


def test_entry_points_in_process_exit_2(capsys, tmp_path, monkeypatch):
    """prepare, evaluate and tokenizer compare go through the same wrapper."""
    from tinyreason import evaluate
    from tinyreason import prepare as prepare_cli
    from tinyreason.tokenizer import __main__ as compare

    monkeypatch.chdir(tmp_path)
    (tmp_path / "latin1.txt").write_bytes("café au lait\n".encode("latin-1") * 50)
    calls = {
        "tinyreason.prepare": (
            lambda: prepare_cli.main(),
            ["prepare", "data=text_files", "data.paths=[latin1.txt]", f"cache_dir={tmp_path}"],
            "is not UTF-8 text (byte 0xe9 at offset 3); convert it",
        ),
        "tinyreason.evaluate": (lambda: evaluate.main(), ["evaluate"], "usage: python -m"),
        "tokenizer compare": (
            lambda: compare.main(["compare", "tokenizer.vocab_size=100"]),
            ["tokenizer"],
            "vocab_size",
        ),
    }
    for name, (call, argv, phrase) in calls.items():
        monkeypatch.setattr(sys, "argv", argv)
        with pytest.raises(SystemExit) as exit_:
            call()
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and phrase in err and "Traceback" not in err, (name, err)


# -- config values (in-process) -------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, phrase",
    [
        (["trainer.max_steps=abc"], "trainer.max_steps='abc' is a str; it must be an int"),
        (["trainer.max_steps=true"], "trainer.max_steps=True is a bool"),
        (["optim.lr=abc"], "optim.lr='abc' is a str; it must be a number"),
        (["optim.lr=-1"], "lr > 0"),
        (["optim.betas=[0.9]"], "optim.betas must be two numbers"),
        (["data.batch_size=2.5"], "data.batch_size=2.5 is a float"),
        (["data.seq_len=0"], "data.seq_len must be positive"),
        (["data.num_workers=-1"], "data.num_workers must be >= 0"),
        (["data.rebuild_damaged=yes"], "data.rebuild_damaged='yes'"),
        (["data.corpus.num_train=abc"], "data.corpus.num_train='abc'"),
        (["trainer.devices=0"], "trainer.devices must be a positive number or auto"),
        (["trainer.limit_val_batches=-1"], "limit_val_batches"),
        (["trainer.gradient_clip_val=-1"], "gradient_clip_val must be positive or null"),
        (["eval.max_new_tokens=abc"], "eval.max_new_tokens='abc'"),
        (["seed=abc"], "seed must be an int"),
        (["tokenizer=hf"], "tokenizer.path has no value: pass tokenizer.path=<value>"),
        (["model.hidden_size=-5"], "hidden_size must be >= 1"),
        (
            ["model=dense", "model.attention.num_heads=7", "model.attention.num_kv_heads=2"],
            "num_kv_heads (2) must divide num_heads (7)",
        ),
        (["model.init_from=/nonexistent/run"], "model.init_from=/nonexistent/run: neither"),
        (["data=text_files", "data.paths=[]"], "data.paths is empty"),
    ],
)
def test_bad_values_are_refused_naming_the_key(make_cfg, overrides, phrase):
    with pytest.raises(ValueError) as err:
        RunConfig.from_hydra(make_cfg(*overrides))
    assert phrase in str(err.value)


# -- text files, HF folders, FP8 shapes (in-process) ----------------------------------------------


@pytest.mark.parametrize(
    "name, content, phrase",
    [
        ("empty.txt", b"", "holds no text; remove it from data.paths"),
        ("blank.txt", b"\n \n\t\n", "holds no text"),
        ("image.txt", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "is binary (it has NUL bytes)"),
        ("latin1.txt", "naïve café\n".encode("latin-1"), "is not UTF-8 text (byte 0xef at off"),
        ("cut.txt.gz", gzip.compress(b"some text " * 100)[:30], "is not a readable .gz file"),
        ("rows.jsonl", b'{"text": "a"}\n{"text": "b",\n', "line 2 is not JSON"),
        ("list.jsonl", b'["a", "b"]\n', "line 1 has no field text_key='text'"),
        ("numbers.jsonl", b'{"text": 12}\n', "line 1: 'text' is not a string"),
        ("table.parquet", b"PAR1 not really", "is not a parquet file with a text_key='text'"),
    ],
)
def test_text_files_users_get_wrong(tmp_path, name, content, phrase):
    (tmp_path / name).write_bytes(content)
    corpus = TextFilesCorpus(TextFilesConfig(paths=(str(tmp_path / name),)))
    with pytest.raises(ValueError) as err:
        corpus.texts("train")
    assert phrase in str(err.value) and str(tmp_path / name) in str(err.value)
    assert (tmp_path / name).read_bytes() == content


@pytest.mark.parametrize(
    "config, phrase",
    [
        ({"model_type": "gpt2", "n_embd": 64, "n_layer": 2}, "cannot import model_type='gpt2'"),
        ({"model_type": "no_such_model"}, "config.json is not a config transformers reads"),
        ("{not json", "config.json is not a config transformers reads"),
    ],
)
def test_unsupported_hf_folders_for_init_from(make_cfg, tmp_path, config, phrase):
    folder = tmp_path / "hf"
    folder.mkdir()
    text = config if isinstance(config, str) else json.dumps(config)
    (folder / "config.json").write_text(text)
    with pytest.raises(ValueError) as err:
        RunConfig.from_hydra(make_cfg(f"model.init_from={folder}"))
    assert phrase in str(err.value)


def test_fp8_refuses_a_model_no_kernel_takes():
    """hidden_size 100: no linear has K and N multiples of 16, so 'fp8' would be bf16 throughout
    (a model where some shapes fit keeps the others in bf16 and logs them: test_precision)."""
    from tinyreason.model import CausalLM, ModelConfig
    from tinyreason.training.precision import PrecisionConfig, apply_precision

    config = ModelConfig.from_dict(
        {
            "vocab_size": 512,
            "hidden_size": 100,
            "num_layers": 1,
            "intermediate_size": 200,
            "max_seq_len": 64,
            "attention": {"kind": "gqa", "num_heads": 5, "num_kv_heads": 1},
            "moe": None,
        }
    )
    with pytest.raises(ValueError, match="no GEMM of this model has a shape the FP8 kernels take"):
        apply_precision(CausalLM(config), PrecisionConfig("fp8", "tensorwise", True))


# -- the shard cache (in-process) -----------------------------------------------------------------

LINES = [f"Line {i}: {i * 7} lazy dogs, {i * 3} quick foxes." for i in range(3000)]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok") / "bpe"
    tk.train_bpe(iter(LINES), tk.TokenizerConfig(vocab_size=300)).save_pretrained(folder)
    return folder


@pytest.fixture
def cache(tmp_path, tok_dir, monkeypatch):
    """A stream cache of several chunks per split; (make, root) with `make(**kw)` the
    `shards.prepare` call every run makes."""
    monkeypatch.setattr(shards, "_CHUNK_TOKENS", 1024)  # litdata fills a chunk per item past it
    monkeypatch.setattr(shards, "_DOCS_PER_ITEM", 8)
    corpus = TextFilesCorpus(TextFilesConfig(paths=(str(_write(tmp_path)),), doc_chars=300))

    def make(**kw):
        return shards.prepare(tmp_path / "data", "c", "t", tok_dir, 300, corpus.documents, **kw)

    make()
    return make, tmp_path / "data" / "c" / "t"


def chunks(files: dict[str, str]) -> dict[str, str]:
    """The token chunks of a snapshot (litdata's index.json has a time stamp)."""
    return {k: v for k, v in files.items() if k.endswith(".bin")}


def _write(tmp_path: Path) -> Path:
    (tmp_path / "lines.txt").write_text("\n".join(LINES))
    return tmp_path / "lines.txt"


def test_manifest_records_every_file(cache):
    make, root = cache
    manifest = make()
    chunks = sorted(p.name for p in (root / "train").glob("chunk-*.bin"))
    assert manifest["format_version"] == shards.FORMAT_VERSION == 3 and len(chunks) >= 3
    assert set(manifest["files"]) == {
        f"{s}/{p.name}" for s in shards.SPLITS for p in (root / s).iterdir()
    }
    for name, record in manifest["files"].items():
        data = (root / name).read_bytes()
        assert record == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


@pytest.mark.parametrize(
    "damage, phrase",
    [
        ("truncate", "train/chunk-0-1.bin has 1,000 bytes, the manifest says "),
        ("delete", "train/chunk-0-1.bin is missing"),
        ("flip", "train/chunk-0-1.bin has the recorded size but another sha256"),
        ("manifest", "manifest.json is missing"),
        ("garble", "manifest.json is unreadable"),
    ],
)
def test_a_damaged_cache_is_named_then_rebuilt_on_request(cache, damage, phrase):
    make, root = cache
    good = snapshot(root)
    chunk = root / "train" / "chunk-0-1.bin"
    if damage == "truncate":
        chunk.write_bytes(chunk.read_bytes()[:1000])
    elif damage == "delete":
        chunk.unlink()
    elif damage == "flip":
        data = bytearray(chunk.read_bytes())
        data[100] ^= 0xFF
        chunk.write_bytes(bytes(data))
    else:
        manifest = root / shards.MANIFEST
        manifest.unlink() if damage == "manifest" else manifest.write_text('{"format')
    damaged = snapshot(root)
    with pytest.raises(shards.DamagedShards) as err:
        make()
    message = str(err.value)
    assert message.startswith(f"shard cache {root} is damaged: {phrase}")
    assert "data.rebuild_damaged=true" in message and "python -m tinyreason.prepare" in message
    assert snapshot(root) == damaged, "a refusal touches nothing"
    make(rebuild_damaged=True)
    assert chunks(snapshot(root)) == chunks(good), "the rebuild writes the same tokens"
    assert set(snapshot(root)) == set(good)


def test_a_format_2_cache_is_checked_by_size_against_litdata_index(cache):
    """Caches written before the manifest recorded its files: still read, their chunks' sizes
    checked against litdata's index.json (no checksums there)."""
    make, root = cache
    manifest = json.loads((root / shards.MANIFEST).read_text())
    del manifest["files"]
    manifest["format_version"] = 2
    (root / shards.MANIFEST).write_text(json.dumps(manifest))
    assert make()["format_version"] == 2
    chunk = root / "validation" / "chunk-0-0.bin"
    chunk.write_bytes(chunk.read_bytes()[:10])
    with pytest.raises(shards.DamagedShards, match="chunk-0-0.bin has 10 bytes, litdata's index"):
        make()
    assert make(rebuild_damaged=True)["format_version"] == 3


def test_an_incomplete_tokenizer_folder_is_rebuilt(tmp_path):
    """A tokenizer folder without tokenizer.json (a crash, a half copy) was an OSError from the
    rename; it is rebuilt."""
    config = tk.TokenizerConfig(vocab_size=300)
    folder = tmp_path / "tokenizers" / config.fingerprint("c")
    folder.mkdir(parents=True)
    (folder / "special_tokens_map.json").write_text("{}")
    tokenizer, path = tk.load_or_train(config, tmp_path, "c", lambda: iter(LINES))
    assert path == folder and (folder / "tokenizer.json").is_file()
    assert tokenizer("Line 7") == tk.load(folder)("Line 7")


# -- real processes: exit 2 per class -------------------------------------------------------------


def test_cli_config_error_leaves_the_run_dir_alone(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"weights of a good run")
    (run / "notes.txt").write_text("mine")
    before = snapshot(run)
    proc = run_train_cli(
        "model=dense",
        "model.attention.num_heads=7",
        "model.attention.num_kv_heads=2",
        "logger=none",
        f"hydra.run.dir={run}",
        cwd=tmp_path,
    )
    assert_user_error(proc, "GQAConfig.num_kv_heads (2) must divide num_heads (7)")
    assert snapshot(run) == before


def test_cli_damaged_cache_stops_before_any_step(make_cfg, cache_dir, tmp_path):
    """A truncated chunk (a crashed copy, a full disk) was litdata's "Timed out ... waiting for
    chunk ... hung or crashed download" at the first step; now the run stops before any."""
    data = prepare(make_cfg("debug=fast"))
    mine = tmp_path / "cache"  # a private copy: the session's cache stays whole
    for part in (data.tokenizer_dir, data.shard_root):
        shutil.copytree(part, mine / part.relative_to(cache_dir))
    root = mine / data.shard_root.relative_to(cache_dir)
    chunk = root / "train" / "chunk-0-0.bin"
    chunk.write_bytes(chunk.read_bytes()[:5000])
    run = tmp_path / "run"
    proc = run_train_cli(
        "debug=fast", "logger=none", f"cache_dir={mine}", f"hydra.run.dir={run}", cwd=tmp_path
    )
    assert_user_error(
        proc,
        f"shard cache {root} is damaged: train/chunk-0-0.bin has 5,000 bytes, the manifest says",
        "data.rebuild_damaged=true",
        f"python -m tinyreason.prepare debug=fast logger=none cache_dir={mine}`",
    )
    assert not (run / "checkpoints").exists() and chunk.stat().st_size == 5000
    cfg = make_cfg("debug=fast", "data.rebuild_damaged=true")
    with open_dict(cfg):
        cfg.cache_dir = str(mine)
    rebuilt = prepare(cfg).manifest
    assert rebuilt["splits"] == data.manifest["splits"]
    assert chunks(snapshot(root)) == chunks(snapshot(data.shard_root))


def test_cli_export_refuses_a_non_empty_folder_before_reading_anything(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text('{"mine": true}')
    before = snapshot(out)
    proc = run_cli("tinyreason.export", f"ckpt={tmp_path}/absent.ckpt", f"out={out}", cwd=tmp_path)
    assert_user_error(proc, f"out='{out}' is not empty; pass overwrite=true")
    assert snapshot(out) == before


def test_cli_missing_checkpoint(tmp_path):
    proc = run_cli(
        "tinyreason.generate", f"ckpt={tmp_path}/run", "prompt=What is 2 + 3?", cwd=tmp_path
    )
    assert_user_error(proc, f"no checkpoint at {tmp_path}/run")
