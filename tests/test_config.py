"""Every shipped config composes and validates; bad input fails early with a useful message."""

import pytest
from conftest import GROUPS, group_options, run_train_cli

from tinyreason.train import validate_config


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
    }[group]
    assert chosen == option
    validate_config(cfg)


@pytest.mark.parametrize("model", group_options("model"))
@pytest.mark.parametrize("precision", group_options("precision"))
def test_model_precision_grid_validates_under_debug(make_cfg, model, precision):
    validate_config(make_cfg(f"model={model}", f"precision={precision}", "debug=fast"))


def test_unknown_group_option_lists_allowed_values():
    proc = run_train_cli("model=nonexistent", timeout=120)
    assert proc.returncode != 0
    for option in group_options("model"):
        assert option in proc.stderr


def test_unknown_key_fails_before_work():
    proc = run_train_cli("trainer.nonexistent_key=1", timeout=120)
    assert proc.returncode != 0
    assert "nonexistent_key" in proc.stderr


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
        validate_config(cfg)


def test_model_vocab_is_never_typed(make_cfg):
    from omegaconf import open_dict

    cfg = make_cfg()
    with open_dict(cfg):
        cfg.model.vocab_size = 1000
    with pytest.raises(ValueError, match="vocab_size"):
        validate_config(cfg)


@pytest.mark.parametrize("experiment", group_options("experiment"))
def test_every_point_of_every_experiment_sweep_validates(make_cfg, experiment):
    from conftest import CONF
    from omegaconf import OmegaConf

    params = OmegaConf.load(CONF / "experiment" / f"{experiment}.yaml").hydra.sweeper.params
    assert params, f"experiment {experiment} sweeps nothing"
    for key, values in params.items():
        for value in str(values).split(","):
            validate_config(make_cfg(f"experiment={experiment}", f"{key}={value}"))
