"""Hugging Face interop: exports load in transformers with our logits and generations, imports
reproduce every tensor, the tokenizer and chat template survive, bad input is refused.

Debug sizes with randomised norm weights and router bias (init leaves them at 1 and 0, which would
hide a norm or a bias that is not exported)."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from tinyreason.checkpoints import export_model, load_checkpoint
from tinyreason.export import export
from tinyreason.generate import generate
from tinyreason.model import CausalLM, MTPConfig, debug_config
from tinyreason.model.hf import (
    from_hf_state_dict,
    fuse_experts,
    load_pretrained,
    save_pretrained,
    split_experts,
)
from tinyreason.model.hf_config import from_hf_config, to_hf_config
from tinyreason.tokenizer import TokenizerConfig, chat_document, train_bpe

V = 512
TARGETS = {  # name -> (debug kind, HF class)
    "deepseek_v3_dense_mla": ("dense_mla", "DeepseekV3ForCausalLM"),
    "deepseek_v3_moe": ("moe", "DeepseekV3ForCausalLM"),
    "deepseek_v3_moe_no_q_lora": ("moe", "DeepseekV3ForCausalLM"),
    "llama": ("dense", "LlamaForCausalLM"),
    "qwen3": ("dense", "Qwen3ForCausalLM"),
}


def target_config(name: str):
    cfg = debug_config(V, TARGETS[name][0])
    if name == "deepseek_v3_moe_no_q_lora":
        cfg = dataclasses.replace(cfg, attention=dataclasses.replace(cfg.attention, q_lora_rank=0))
    if name in ("llama", "qwen3"):  # Llama / Qwen3 have no MTP
        attention = dataclasses.replace(cfg.attention, qk_norm=name == "qwen3")
        cfg = dataclasses.replace(cfg, attention=attention, mtp=MTPConfig(depth=0))
    return cfg


def randomise(model: CausalLM, seed: int = 1) -> CausalLM:
    """Norm weights ~ 1 + 0.3 N(0, 1), router bias ~ 0.1 N(0, 1): both change the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))
    return model.eval()


@pytest.fixture(scope="module")
def tokenizer():
    docs = [
        chat_document(f"What is {i} + {i + 1}?", f"<think>{i}+{i + 1}</think>{2 * i + 1}")
        for i in range(40)
    ]
    return train_bpe(docs, TokenizerConfig(vocab_size=320))


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tokenizer):
    """name -> (our model, its export folder); built once per module, on first use."""
    cache: dict = {}

    def get(name: str):
        if name not in cache:
            torch.manual_seed(0)
            model = randomise(CausalLM(target_config(name)))
            folder = tmp_path_factory.mktemp(name)
            save_pretrained(model, folder, tokenizer, overwrite=True)
            cache[name] = model, folder
        return cache[name]

    return get


def load_hf(folder, **kwargs):
    model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True, **kwargs)
    return model.eval(), info


def assert_only_mtp_unexpected(info: dict, num_layers: int, depth: int) -> None:
    assert not info["missing_keys"] and not info["mismatched_keys"], info
    mtp = re.compile(rf"model\.layers\.({'|'.join(str(num_layers + k) for k in range(depth))})\.")
    stray = [k for k in info["unexpected_keys"] if not (depth and mtp.match(k))]
    assert not stray, stray
    assert bool(info["unexpected_keys"]) == bool(depth)


PARITY = [
    (name, attn, experts)
    for name in TARGETS
    for attn in ("eager", "sdpa")
    for experts in (("eager", "grouped_mm") if "moe" in name else (None,))
]


@pytest.mark.parametrize("name, attn, experts", PARITY)
def test_transformers_logits_equal_ours(exported, name, attn, experts):
    model, folder = exported(name)
    kwargs = {"attn_implementation": attn}
    if experts:
        kwargs["experts_implementation"] = experts
    hf, info = load_hf(folder, **kwargs)
    assert type(hf).__name__ == TARGETS[name][1]
    assert hf.config._attn_implementation == attn
    if experts:
        assert hf.config._experts_implementation == experts
    cfg = model.config
    assert_only_mtp_unexpected(info, cfg.num_layers, cfg.mtp.depth)
    ids = torch.randint(0, V, (2, 48), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        diff = (hf(ids).logits - model(ids).logits).abs().max().item()
    print(f"max |logit diff| {name} attn={attn} experts={experts}: {diff:.1e}")
    assert diff <= 1e-5


@pytest.mark.parametrize("name", TARGETS)
def test_greedy_generation_equals_transformers_generate(exported, name):
    model, folder = exported(name)
    hf, _ = load_hf(folder)
    hf.generation_config.eos_token_id = None  # 32 tokens whatever comes
    prompt = torch.randint(0, V, (1, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        theirs = hf.generate(prompt, max_new_tokens=32, do_sample=False)[:, 7:]
    assert theirs.shape == (1, 32)
    for use_cache in (True, False):
        ours = generate(model, prompt, 32, use_cache=use_cache)
        assert torch.equal(ours, theirs), use_cache


@pytest.mark.parametrize("name", TARGETS)
def test_import_of_export_reproduces_every_tensor(exported, name):
    model, folder = exported(name)
    back = load_pretrained(folder)
    assert back.config == model.config
    ours, theirs = model.state_dict(), back.state_dict()
    assert ours.keys() == theirs.keys()
    for key, value in ours.items():
        assert theirs[key].dtype == value.dtype and torch.equal(theirs[key], value), key


def test_import_reads_fused_experts_on_disk(exported):
    """HF's in-memory layout (gate_up_proj [E, 2I, D]) saved as is also imports exactly."""
    model, folder = exported("deepseek_v3_moe")
    fused = fuse_experts(load_file(folder / "model.safetensors"))
    assert "model.layers.1.mlp.experts.gate_up_proj" in fused
    tensors = from_hf_state_dict(fused, model)
    for key, value in model.state_dict().items():
        assert torch.equal(tensors[key], value), key


def test_fused_and_per_expert_layouts_convert_exactly():
    E, I, D = 3, 4, 5  # noqa: E741
    fused = {
        "layers.1.mlp.experts.gate_up_proj": torch.randn(E, 2 * I, D),
        "layers.1.mlp.experts.down_proj": torch.randn(E, D, I),
        "norm.weight": torch.randn(D),
    }
    per_expert = split_experts(fused)
    assert len(per_expert) == 3 * E + 1
    for e in range(E):
        gate_up = fused["layers.1.mlp.experts.gate_up_proj"][e]
        assert torch.equal(per_expert[f"layers.1.mlp.experts.{e}.gate_proj.weight"], gate_up[:I])
        assert torch.equal(per_expert[f"layers.1.mlp.experts.{e}.up_proj.weight"], gate_up[I:])
        down = fused["layers.1.mlp.experts.down_proj"][e]
        assert torch.equal(per_expert[f"layers.1.mlp.experts.{e}.down_proj.weight"], down)
    again = fuse_experts(per_expert)
    assert again.keys() == fused.keys()
    assert all(torch.equal(again[k], fused[k]) for k in fused)
    with pytest.raises(ValueError, match="expert 2 lacks its up_proj"):
        fuse_experts(
            {k: v for k, v in per_expert.items() if k != "layers.1.mlp.experts.2.up_proj.weight"}
        )


def test_mtp_weights_stored_under_deepseek_names(exported):
    model, folder = exported("deepseek_v3_moe")
    config = json.loads((folder / "config.json").read_text())
    assert config["num_nextn_predict_layers"] == 1 and config["first_k_dense_replace"] == 1
    assert config["n_group"] == 4 and config["topk_group"] == 2
    n, mtp = model.config.num_layers, model.mtp[0]
    with safe_open(folder / "model.safetensors", framework="pt") as f:
        layer = lambda key: f.get_tensor(f"model.layers.{n}.{key}")
        expected = {
            "enorm.weight": mtp.enorm.weight,
            "hnorm.weight": mtp.hnorm.weight,
            "eh_proj.weight": mtp.eh_proj.weight,
            "shared_head.norm.weight": mtp.norm.weight,
            "shared_head.head.weight": model.lm_head.weight,
            "embed_tokens.weight": model.embed_tokens.weight,
            "input_layernorm.weight": mtp.block.input_layernorm.weight,
            "self_attn.kv_b_proj.weight": mtp.block.self_attn.kv_b_proj.weight,
            "mlp.gate.e_score_correction_bias": mtp.block.mlp.gate.e_score_correction_bias,
            "mlp.experts.5.up_proj.weight": split_experts(
                {"x.experts.gate_up_proj": mtp.block.mlp.experts.gate_up_proj}
            )["x.experts.5.up_proj.weight"],
        }
        for key, value in expected.items():
            assert torch.equal(layer(key), value.detach()), key
        # the trained router bias of a main layer is exported too
        bias = f.get_tensor("model.layers.1.mlp.gate.e_score_correction_bias")
        assert torch.equal(bias, model.layers[1].mlp.gate.e_score_correction_bias)
        assert bias.dtype == torch.float32 and bias.abs().sum() > 0


def test_exported_tokenizer_and_chat_template(exported, tokenizer):
    _, folder = exported("qwen3")
    assert not (folder / "chat_template.jinja").exists()
    assert "chat_template" in json.loads((folder / "tokenizer_config.json").read_text())
    auto = AutoTokenizer.from_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    assert (auto.bos_token_id, auto.eos_token_id, auto.pad_token_id) == (
        config["bos_token_id"],
        config["eos_token_id"],
        config["pad_token_id"],
    )
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 3 + 4?"},
        {"role": "assistant", "content": "<think>3+4</think>7"},
    ]
    ids = auto.apply_chat_template(messages, tokenize=True, return_dict=False)
    document = chat_document("What is 3 + 4?", "<think>3+4</think>7", system="Be brief.")
    assert ids == tokenizer.encode(document, add_special_tokens=False)
    prompt = auto.apply_chat_template(messages[:2], add_generation_prompt=True, return_dict=False)
    assert prompt == tokenizer.apply_chat_template(
        messages[:2], add_generation_prompt=True, return_dict=False
    )
    assert auto.convert_ids_to_tokens(prompt[-1]) == "<|assistant|>"


def test_sharded_export_loads_in_transformers_and_back(tmp_path, exported):
    model, _ = exported("deepseek_v3_moe")
    save_pretrained(model, tmp_path, max_shard_size="100KB")
    shards = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 1 and not (tmp_path / "model.safetensors").exists()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == shards
    hf, info = load_hf(tmp_path)
    assert_only_mtp_unexpected(info, model.config.num_layers, 1)
    ids = torch.randint(0, V, (1, 16))
    with torch.no_grad():
        assert (hf(ids).logits - model(ids).logits).abs().max() <= 1e-5
    back = load_pretrained(tmp_path)
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in model.state_dict().items())
    # overwrite=true with a single-file export removes the old shards
    save_pretrained(model, tmp_path, overwrite=True)
    assert (
        not list(tmp_path.glob("model-*"))
        and not (tmp_path / "model.safetensors.index.json").exists()
    )


def test_bf16_export_keeps_router_fp32(tmp_path, exported):
    model, _ = exported("deepseek_v3_moe")
    export_model(model, None, tmp_path, dtype="bfloat16")
    with safe_open(tmp_path / "model.safetensors", framework="pt") as f:
        assert f.get_tensor("model.layers.1.mlp.gate.weight").dtype == torch.float32
        assert (
            f.get_tensor("model.layers.1.mlp.gate.e_score_correction_bias").dtype == torch.float32
        )
        assert f.get_tensor("model.layers.1.self_attn.o_proj.weight").dtype == torch.bfloat16
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"


# ---------------------------------------------------------------------------------------------
# bad input


def test_non_empty_folder_needs_overwrite(tmp_path, exported):
    model, _ = exported("llama")
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty; pass overwrite=true"):
        save_pretrained(model, tmp_path)
    save_pretrained(model, tmp_path, overwrite=True)
    assert (tmp_path / "notes.txt").read_text() == "mine"  # overwrite replaces the export only


def test_unsupported_combinations_are_refused_by_name(tmp_path):
    dense = debug_config(V, "dense")
    gqa_moe = dataclasses.replace(dense, moe=debug_config(V, "moe").moe, num_dense_layers=1)
    with pytest.raises(ValueError, match=r"GQA attention \+ MoE"):
        to_hf_config(gqa_moe)
    model = CausalLM(dense)  # GQA + MTP depth 1
    with pytest.raises(ValueError, match=r"GQA attention \+ MTP .*drop_mtp=true"):
        save_pretrained(model, tmp_path / "a")
    assert not (tmp_path / "a").exists()
    save_pretrained(CausalLM(target_config("llama")), tmp_path / "c")
    with pytest.raises(ValueError, match=r"GQA attention \+ MTP"):
        save_pretrained(model, tmp_path / "c", overwrite=True)
    assert (tmp_path / "c" / "model.safetensors").is_file()  # a refused export touches nothing
    export_model(model, None, tmp_path / "b", drop_mtp=True)
    hf, info = load_hf(tmp_path / "b")
    assert type(hf).__name__ == "Qwen3ForCausalLM" and not info["unexpected_keys"]
    ids = torch.randint(0, V, (1, 9))
    with torch.no_grad():
        assert (hf(ids).logits - model.eval()(ids).logits).abs().max() <= 1e-5


def test_imports_refuse_what_we_do_not_compute(exported):
    _, folder = exported("deepseek_v3_moe")
    from_hf_config(AutoConfig.from_pretrained(folder))
    for change, message in [
        (
            {"rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e4}},
            "rope_type",
        ),
        ({"rope_interleave": False}, "rope_interleave"),
        ({"quantization_config": {"quant_method": "fp8"}}, "quantized"),
    ]:
        bad = AutoConfig.from_pretrained(folder)
        for key, value in change.items():
            setattr(bad, key, value)
        with pytest.raises(ValueError, match=message):
            from_hf_config(bad)
    with pytest.raises(ValueError, match="model_type='mistral'"):
        from_hf_config(type("Cfg", (), {"model_type": "mistral"})())


def fake_run(tmp_path, model: CausalLM, tokenizer):
    """A run folder as training leaves it: checkpoints/last.ckpt (LitCausalLM layout) + tokenizer/."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    state = {
        "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
        "hyper_parameters": {"model": model.config.to_dict(), "optim": {}, "precision": {}},
        "global_step": 10,
    }
    torch.save(state, run / "checkpoints" / "last.ckpt")
    tokenizer.save_pretrained(run / "tokenizer")
    return run


def test_export_from_a_run_dir_and_checkpoint_errors(tmp_path, exported, tokenizer):
    model, _ = exported("deepseek_v3_dense_mla")
    run = fake_run(tmp_path, model, tokenizer)
    out = export(run, tmp_path / "hf")
    assert sorted(p.suffix for p in out.iterdir()) == [".json"] * 4 + [".safetensors"]
    for file in out.iterdir():  # no pickles: neither torch zip archives nor raw pickle streams
        assert file.read_bytes()[:2] not in (b"PK", b"\x80\x02", b"\x80\x04"), file
    back = load_pretrained(out)
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="not empty"):
        export(run / "checkpoints" / "last.ckpt", out)

    with pytest.raises(ValueError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "missing")
    data = (run / "checkpoints" / "last.ckpt").read_bytes()
    (tmp_path / "truncated.ckpt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated.ckpt is damaged or incomplete"):
        load_checkpoint(tmp_path / "truncated.ckpt")
    torch.save({"state_dict": {}, "hyper_parameters": {"model": Path("x")}}, tmp_path / "obj.ckpt")
    with pytest.raises(ValueError, match="not a tinyreason checkpoint of tensors"):
        load_checkpoint(tmp_path / "obj.ckpt")  # weights_only=True refuses arbitrary objects
    with pytest.raises(ValueError, match="no tokenizer at"):
        export(run, tmp_path / "x", tokenizer=str(tmp_path / "none"))
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("name", TARGETS)
def test_config_round_trips_through_transformers(name):
    cfg = target_config(name)
    if cfg.moe is not None:
        cfg = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, routed_scaling_factor=1.5))
    cfg = dataclasses.replace(cfg, rope_theta=5e5, rms_norm_eps=1e-5, tie_word_embeddings=True)
    assert from_hf_config(to_hf_config(cfg)) == cfg  # training-only knobs are at their defaults


@pytest.mark.parametrize("name", ["deepseek_v3_moe", "llama", "qwen3"])
def test_import_of_a_folder_written_by_transformers(tmp_path, name):
    """What a released checkpoint looks like: transformers' own save_pretrained (its init, no MTP
    weights although DeepseekV3Config says num_nextn_predict_layers=1)."""
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(to_hf_config(target_config(name))).eval()
    with torch.no_grad():  # transformers initialises the router bias to 0: make it matter
        for key, buffer in hf.named_buffers():
            if key.endswith("e_score_correction_bias"):
                buffer.normal_(0, 0.1)
    hf.save_pretrained(tmp_path)
    ours = load_pretrained(tmp_path)
    assert ours.config.mtp.depth == 0
    ids = torch.randint(0, V, (2, 24))
    with torch.no_grad():
        assert (hf(ids).logits - ours(ids).logits).abs().max() <= 1e-5


def test_import_grows_the_vocabulary_for_appended_special_tokens(exported):
    """A vendor tokenizer that gained our special tokens needs more embedding / head rows."""
    model, folder = exported("llama")
    bigger = CausalLM(dataclasses.replace(model.config, vocab_size=V + 64))
    init = bigger.embed_tokens.weight.detach().clone()
    tensors = from_hf_state_dict(load_file(folder / "model.safetensors"), bigger)
    for key in ("embed_tokens.weight", "lm_head.weight"):
        assert tensors[key].shape == (V + 64, 64)
        assert torch.equal(tensors[key][:V], model.state_dict()[key])
    assert torch.equal(tensors["embed_tokens.weight"][V:], init[V:])  # new rows keep their init
