"""`conf/experiment/*.yaml` only select options and set plain values, so the command line always
wins; every point of each sweep composes, and the commands of each experiment's README reproduce
every run of its results table (by the run names of the old `variant` / `vocab` tables).

Composition only (Hydra's compose API): nothing here trains or builds a tokenizer.
"""

from __future__ import annotations

import functools
import itertools
import math
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir())  # model, precision, tokenizer, ...
# the key that tells which option of a group was composed
IDENTITY = {"model": "name", "precision": "name", "tokenizer": "kind", "data": "name",
            "trainer": "accelerator", "logger": "name", "stage": "name"}  # fmt: skip
# valid values of the string keys an experiment sets (a new string key needs its entry)
CHOICES = {
    "tokenizer.digits": ["spaced", "individual", "groups", "none"],
    "data.loss_on": ["assistant", "all"],
    "optim.schedule": ["cosine", "wsd", "constant"],
    "optim.moment_dtype": ["fp32", "bf16"],
    "model.moe.balance": ["both", "aux_free", "aux_loss", "none"],
    "data.corpus.format": ["local", "column"],
}
MAIN = "python -m tinyreason.train -m"


@functools.cache
def compose_train(*overrides: str) -> DictConfig:
    """`python -m tinyreason.train *overrides`'s config, hydra: node included (cached: read only)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides), return_hydra_config=True)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def experiment_yaml(name: str) -> DictConfig:
    return OmegaConf.load(CONF / "experiment" / f"{name}.yaml")


def leaves(node, prefix: str = "") -> dict:
    """{dotted key: value} of every leaf the experiment sets (its defaults list and hydra: aside)."""
    out = {}
    for key, value in node.items():
        path = f"{prefix}{key}"
        if not prefix and key in ("defaults", "hydra"):
            continue
        if isinstance(value, dict):
            out.update(leaves(value, f"{path}."))
        else:
            out[path] = value
    return out


def experiment_leaves(name: str) -> dict:
    return leaves(OmegaConf.to_container(experiment_yaml(name)))


def group_choices(name: str) -> dict[str, str]:
    """{group: option} the experiment's defaults list selects (`- override /precision: bf16`)."""
    out = {}
    for entry in experiment_yaml(name).get("defaults", []):
        ((key, option),) = entry.items()
        out[key.removeprefix("override ").lstrip("/")] = option
    return out


def other_value(key: str, value):
    """A different valid value for `key`, as a command-line string and as composed."""
    if isinstance(value, bool):
        return str(not value).lower(), not value
    if isinstance(value, int):
        return str(value * 2 or 1), value * 2 or 1
    if isinstance(value, float):
        return repr(value / 2), value / 2
    if isinstance(value, str):
        assert key in CHOICES, f"add the valid values of {key} to CHOICES"
        new = next(c for c in CHOICES[key] if c != value)
        return new, new
    raise AssertionError(f"{key}={value!r}: no rule for another value of this type")


def same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return a is not None and b is not None and math.isclose(a, b)
    return a == b


def expand(overrides: list[str]) -> list[list[str]]:
    """The jobs of a `-m` sweep: one list of overrides a grid point (Hydra's own parser)."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    axes = []
    for o in parsed:
        key = o.get_key_element()
        values = (
            list(o.sweep_string_iterator())
            if o.is_sweep_override()
            else [o.get_value_element_as_str()]
        )
        axes.append([f"{key}={v}" for v in values])
    return [list(point) for point in itertools.product(*axes)]


def sweep_jobs(experiment: str, cli: list[str]) -> list[list[str]]:
    """The jobs of `python -m tinyreason.train -m experiment=<experiment> *cli`: the experiment's
    `hydra.sweeper.params` grid with the command line replacing a key it also names, as Hydra's
    basic sweeper does; `hydra.sweeper.params=null` drops the grid."""
    grid = (
        {}
        if "hydra.sweeper.params=null" in cli
        else dict(experiment_yaml(experiment).hydra.sweeper.params)
    )
    cli = [o for o in cli if o != "hydra.sweeper.params=null"]
    keys = {o.split("=", 1)[0] for o in cli}
    params = [f"{k}={v}" for k, v in grid.items() if k not in keys]
    return [[f"experiment={experiment}", *job] for job in expand(params + cli)]


def check_job(cfg: DictConfig, job: list[str]) -> None:
    """Every override of the job is what the composed config holds."""
    for o in OverridesParser.create().parse_overrides(job):
        key, value = o.get_key_element(), o.value()
        if key in GROUPS or key == "experiment":
            assert cfg.hydra.runtime.choices[key] == value, (job, key)
        else:
            assert same(OmegaConf.select(cfg, key), value), (job, key)


# --- experiments select, the command line wins -------------------------------------------------


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_has_no_interpolation_and_no_variant_tables(experiment):
    text = (CONF / "experiment" / f"{experiment}.yaml").read_text()
    assert "${" not in text, (
        "an experiment sets plain values; an interpolation would beat the command line"
    )
    assert not {"variant", "variants", "vocab", "vocabs"} & set(experiment_yaml(experiment))


def test_precision_on_the_command_line_beats_the_experiment():
    cfg = compose_train("experiment=fp8_vs_bf16", "precision=fp32")
    assert cfg.precision.name == "fp32" and cfg.precision.recipe is None
    cfg = compose_train("experiment=fp8_vs_bf16", "precision=fp8_rowwise")
    assert (cfg.precision.name, cfg.precision.recipe) == ("fp8", "rowwise")


def test_tokenizer_keys_stay_overridable_under_vocab_scaling():
    cfg = compose_train("experiment=vocab_scaling", "tokenizer.digits=groups")
    assert cfg.tokenizer.kind == "bpe" and cfg.tokenizer.digits == "groups"
    cfg = compose_train("experiment=vocab_scaling", "tokenizer.vocab_size=8192")
    assert cfg.tokenizer.vocab_size == 8192


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_pins_model_data_tokenizer_and_precision(experiment):
    """A changed project default never silently changes an experiment."""
    assert {"model", "data", "tokenizer", "precision"} <= set(group_choices(experiment))
    pinned = experiment_leaves(experiment)
    for key in ("seed", "tokenizer.digits", "data.loss_on", "data.seq_len", "data.batch_size"):
        assert key in pinned, f"{experiment} does not pin {key}"


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_key_an_experiment_sets_lands_and_yields_to_the_command_line(experiment):
    pinned = experiment_leaves(experiment)
    cfg = compose_train(f"experiment={experiment}")
    assert [k for k, v in pinned.items() if not same(OmegaConf.select(cfg, k), v)] == []
    # every key given another valid value on the command line, in one composition
    others = {key: other_value(key, value) for key, value in pinned.items()}
    cfg = compose_train(
        f"experiment={experiment}", *(f"{k}={text}" for k, (text, _) in others.items())
    )
    lost = [
        f"{k}={text}"
        for k, (text, new) in others.items()
        if not same(OmegaConf.select(cfg, k), new)
    ]
    assert lost == [], f"lost to the experiment: {lost}"


def has_alternatives(group: str) -> bool:
    return len([p for p in (CONF / group).glob("*.yaml") if p.stem != "hf"]) > 1


@pytest.mark.parametrize(
    "experiment, group",
    [(e, g) for e in EXPERIMENTS for g in group_choices(e) if has_alternatives(g)],  # stage: one
    ids=str,
)
def test_every_option_an_experiment_selects_yields_to_the_command_line(experiment, group):
    option = group_choices(experiment)[group]
    cfg = compose_train(f"experiment={experiment}")
    assert cfg.hydra.runtime.choices[group] == option
    other = next(
        p.stem for p in sorted((CONF / group).glob("*.yaml")) if p.stem not in (option, "hf")
    )
    cfg = compose_train(f"experiment={experiment}", f"{group}={other}")
    assert cfg.hydra.runtime.choices[group] == other
    if group in IDENTITY:
        expected = OmegaConf.load(CONF / group / f"{other}.yaml").get(IDENTITY[group])
        if expected is not None:  # an option built on another option's defaults
            assert cfg[group][IDENTITY[group]] == expected


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_point_of_the_sweep_grid_composes(experiment):
    params = experiment_yaml(experiment).hydra.sweeper.params
    assert params, f"experiment {experiment} sweeps nothing"
    jobs = sweep_jobs(experiment, [])
    assert len(jobs) == math.prod(len(str(v).split(",")) for v in params.values())
    for job in jobs:
        check_job(compose_train(*job), job)


# --- the README commands reproduce every run of the old sweeps ---------------------------------

# The rows of each results table, by their old name, as the old `variants` / `vocabs` tables set them.
OLD_RUNS = {
    "fp8_vs_bf16": {
        f"{name}{'_seed1' if seed else ''}": {
            "precision.name": precision,
            "precision.recipe": recipe,
            "optim.moment_dtype": moments,
            "seed": seed,
        }  # fmt: skip
        for name, precision, recipe, moments, seeds in [
            ("bf16", "bf16", None, "fp32", (0, 1)),
            ("tensorwise", "fp8", "tensorwise", "fp32", (0,)),
            ("rowwise", "fp8", "rowwise", "fp32", (0,)),
            ("rowwise_with_gw_hp", "fp8", "rowwise_with_gw_hp", "fp32", (0,)),
            ("blockwise", "fp8_blockwise", "blockwise", "fp32", (0, 1)),
            ("deepseek_v3", "fp8_blockwise", "blockwise", "bf16", (0, 1)),
        ]
        for seed in seeds
    },
    "moe_balance": {
        name: {"model.moe.balance": balance, "model.moe.balance_alpha": alpha, "seed": seed}
        for name, balance, alpha, seed in [
            ("both", "both", 1e-4, 0),
            ("both_seed1", "both", 1e-4, 1),
            ("aux_free", "aux_free", 1e-4, 0),
            ("aux_free_seed1", "aux_free", 1e-4, 1),
            ("aux_loss", "aux_loss", 1e-4, 0),
            ("aux_loss_1e-2", "aux_loss", 1e-2, 0),
            ("none", "none", 1e-4, 0),
        ]
    },
    "vocab_scaling": {
        **{
            f"bpe_{n // 1024}k": {
                "tokenizer.kind": "bpe",
                "tokenizer.vocab_size": n,
                "tokenizer.digits": "individual",
                "data.name": "text_files",
            }
            for n in (1024, 2048, 4096, 8192, 16384, 32768)
        },
        "deepseek_v4": {"tokenizer.kind": "deepseek_v4", "data.name": "text_files"},
        "qwen": {
            "tokenizer.kind": "qwen",
            "tokenizer.variant": "qwen2.5",
            "data.name": "text_files",
        },
        "cl100k": {"tokenizer.kind": "cl100k", "data.name": "text_files"},
    },  # fmt: skip
}
# The `-m` sweeps of each README's command section that reproduce OLD_RUNS (vocab_scaling: the
# real-text corpus, all nine points).
README_SWEEPS = {
    "fp8_vs_bf16": [
        [],
        ["precision=fp8_blockwise", "optim.moment_dtype=bf16", "seed=0,1"],
        ["precision=bf16,fp8_blockwise", "seed=1"],
    ],
    "moe_balance": [
        [],
        ["model.moe.balance=both,aux_free", "seed=1"],
        ["model.moe.balance=aux_loss", "model.moe.balance_alpha=1.0e-2"],
    ],
    "vocab_scaling": [
        ["data=text_files"],
        ["data=text_files", "tokenizer=deepseek_v4,cl100k", "hydra.sweeper.params=null"],
        [
            "data=text_files",
            "tokenizer=qwen",
            "tokenizer.variant=qwen2.5",
            "hydra.sweeper.params=null",
        ],
    ],
}


@pytest.mark.parametrize("experiment", sorted(README_SWEEPS))
def test_readme_sweeps_reproduce_every_old_run_once(experiment):
    readme = (ROOT / "experiments" / experiment / "README.md").read_text()
    found = {}
    for cli in README_SWEEPS[experiment]:
        command = " ".join([MAIN, f"experiment={experiment}", *cli])
        assert command in readme, f"the README lists no `{command}`"
        for job in sweep_jobs(experiment, cli):
            cfg = compose_train(*job)
            check_job(cfg, job)
            names = [
                name
                for name, values in OLD_RUNS[experiment].items()
                if all(same(OmegaConf.select(cfg, k), v) for k, v in values.items())
            ]
            assert len(names) == 1, (job, names)
            assert names[0] not in found, f"{job} repeats {found.get(names[0])}"
            found[names[0]] = job
    assert sorted(found) == sorted(OLD_RUNS[experiment])
