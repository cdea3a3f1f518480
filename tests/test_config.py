"""Every shipped config composes and validates; bad input fails early with a useful message."""

import pytest
from conftest import GROUPS, group_options, run_train_cli

from tinyreason.training.run_config import RunConfig


@pytest.mark.parametrize(
    "override", [f"{g}={o}" for g in GROUPS for o in group_options(g)], ids=lambda s: s
)
def test_every_option_composes_and_validates(make_cfg, override):
    needs = {"tokenizer=hf": ["tokenizer.path=some-org/some-tokenizer"]}  # a mandatory value
    cfg = make_cfg(override, *needs.get(override, []))
    group, option = override.split("=")
    chosen = {
        "model": cfg.model.name,
        "precision": cfg.precision.name,
        "tokenizer": cfg.tokenizer.kind,
        "data": cfg.data.name,
        "trainer": cfg.trainer.accelerator,
        "logger": cfg.logger.name,
        "debug": "fast" if cfg.trainer.max_steps <= 20 else None,
        "stage": cfg.stage.name,
    }[group]
    # precision=fp8_rowwise / fp8_rowwise_with_gw_hp: fp8 with that recipe
    assert chosen == option or (
        group == "precision" and option == f"{chosen}_{cfg.precision.recipe}"
    )
    RunConfig.from_hydra(cfg)


@pytest.mark.parametrize("model", group_options("model"))
@pytest.mark.parametrize("precision", group_options("precision"))
def test_model_precision_grid_validates_under_debug(make_cfg, model, precision):
    RunConfig.from_hydra(make_cfg(f"model={model}", f"precision={precision}", "debug=fast"))


def test_unknown_group_option_lists_allowed_values():
    proc = run_train_cli("model=nonexistent", timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr  # a user error (errors.py)
    for option in group_options("model"):
        assert option in proc.stderr


def test_unknown_key_fails_before_work():
    proc = run_train_cli("trainer.nonexistent_key=1", timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "nonexistent_key is not a key of trainer; allowed: accelerator" in proc.stderr


@pytest.mark.parametrize(
    "override, field",
    [
        ("model.attention.num_heads=5", "num_heads"),  # 5 heads do not divide 192 (gqa)
        ("model.moe.num_experts_per_tok=9", "num_experts_per_tok"),  # top-k > experts
        ("model.moe.num_groups=3", "num_groups"),  # 8 experts not divisible by 3 groups
        ("model.num_dense_layers=9", "num_dense_layers"),
        ("precision.recipe=blockwise", "recipe"),
        ("tokenizer.vocab_size=100", "vocab_size"),
        ("optim.schedule=linear", "schedule"),
        ("trainer.val_check_interval=7", "val_check_interval"),
        ("ckpt_path=/nonexistent/last.ckpt", "ckpt_path"),
        ("moe_heatmap_every=0", "moe_heatmap_every"),
    ],
)
def test_inconsistent_values_raise_valueerror_naming_the_field(make_cfg, override, field):
    model = "model=dense" if "attention.num_heads" in override else "model=moe"
    cfg = make_cfg(model, override)
    with pytest.raises(ValueError, match=field):
        RunConfig.from_hydra(cfg)


def test_model_vocab_is_never_typed(make_cfg):
    from omegaconf import open_dict

    cfg = make_cfg()
    with open_dict(cfg):
        cfg.model.vocab_size = 1000
    with pytest.raises(ValueError, match="vocab_size"):
        RunConfig.from_hydra(cfg)


@pytest.mark.parametrize("experiment", group_options("experiment"))
def test_every_point_of_every_experiment_sweep_validates(make_cfg, experiment):
    """Every job of the experiment's grid and of its README's other sweeps (test_experiments)."""
    from test_experiments import README_SWEEPS, sweep_jobs

    jobs = [
        job for cli in README_SWEEPS.get(experiment, [[]]) for job in sweep_jobs(experiment, cli)
    ]
    assert jobs, f"experiment {experiment} sweeps nothing"
    for job in jobs:
        RunConfig.from_hydra(make_cfg(*job))


@pytest.mark.parametrize("data", group_options("data"))
def test_debug_fast_composes_with_every_data_option(make_cfg, data):
    run = RunConfig.from_hydra(make_cfg("debug=fast", f"data={data}"))
    assert run.data.name == data and run.trainer.max_steps == 10 and run.data.seq_len == 320


def test_the_run_config_does_not_edit_the_hydra_config(make_cfg, tmp_path):
    """A Hugging Face start takes its architecture and tokenizer from the folder without
    rewriting `cfg.tokenizer` (the saved config is the one that ran)."""
    from omegaconf import OmegaConf

    from tinyreason.checkpoints import export_model
    from tinyreason.model import CausalLM, debug_config
    from tinyreason.tokenizer import TokenizerConfig, chat_document, train_bpe

    tok = train_bpe(
        [chat_document("What is 2 + 2?", "Answer: 4")] * 50, TokenizerConfig(vocab_size=300)
    )
    model = CausalLM(debug_config(vocab_size=320, kind="dense"))
    folder = export_model(model, tok, tmp_path / "hf", drop_mtp=True)
    cfg = make_cfg(f"model.init_from={folder}", "data.seq_len=64", "export.hf=false")
    before = OmegaConf.to_yaml(cfg)
    run = RunConfig.from_hydra(cfg)
    assert OmegaConf.to_yaml(cfg) == before
    assert run.tokenizer == TokenizerConfig(kind="hf", path=str(folder))
    assert run.model.vocab_size == 320 and run.model.attention.kind == "gqa"
    assert run.model_for(256).vocab_size == 320 and run.model_for(384).vocab_size == 384


@pytest.mark.parametrize("tokenizer", [t for t in group_options("tokenizer") if t != "hf"])
def test_debug_fast_composes_with_every_tokenizer_option(make_cfg, tokenizer):
    cfg = make_cfg("debug=fast", f"tokenizer={tokenizer}")
    run = RunConfig.from_hydra(cfg)
    assert run.tokenizer.kind == tokenizer
    assert (run.tokenizer.vocab_size == 512) == (tokenizer == "bpe")  # debug's small BPE only
