"""stage=grpo: advantages and losses against a hand computation, the subset fast path against
all rows, a toy reward that must rise, exact resume with reused rollouts, MoE under FP8, KL,
bad input refused before the run."""

from __future__ import annotations

import math

import pytest
import torch
from test_sft import StopAfterValidation

from tinyreason.train import train
from tinyreason.training.grpo import group_advantages, grpo_loss, token_logps
from tinyreason.training.grpo_data import GRPOConfig, StepPrompts
from tinyreason.training.rewards import overlong, well_formed, working


def sevens(question: str, completion: str, answer: str) -> float:
    """The toy reward: the share of the completion's digits that are a 7."""
    digits = [c for c in completion if c.isdigit()]
    return sum(c == "7" for c in digits) / max(len(digits), 1)


def raises(question: str, completion: str, answer: str) -> float:
    raise RuntimeError("broken reward")


def not_a_number(question: str, completion: str, answer: str):
    return "1"


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.5, 0.5, 0.5, 0.5])
    adv, std = group_advantages(rewards, 4, "group")
    s = math.sqrt((0.75**2 + 3 * 0.25**2) / 3)  # Bessel's correction
    expected = [0.75 / (s + 1e-4)] + [-0.25 / (s + 1e-4)] * 3 + [0.0] * 4
    assert adv.tolist() == pytest.approx(expected, rel=1e-6)
    assert std.tolist() == pytest.approx([s] * 4 + [0.0] * 4, rel=1e-6)
    adv, _ = group_advantages(rewards, 4, "none")
    assert adv.tolist() == pytest.approx([0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0])


def test_a_group_of_equal_fractional_rewards_has_exactly_no_signal():
    rewards = torch.tensor([0.3] * 8 + [0.3] * 7 + [0.4])
    adv, std = group_advantages(rewards, 8, "group")
    assert adv[:8].tolist() == [0.0] * 8 and std[:8].tolist() == [0.0] * 8
    assert (adv[8:] != 0).all()


def _fixed_group():
    torch.manual_seed(0)
    logps = -torch.rand(3, 5) * 2
    old = logps + torch.tensor(
        [[0.0, 0.3, -0.3, 0.1, 0.0]] * 3
    )  # ratios inside and outside the clip
    ref = logps - 0.2 * torch.rand(3, 5)
    adv = torch.tensor([1.0, -0.5, 0.0])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], dtype=torch.bool)
    return logps, old, ref, adv, mask


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_grpo_loss_equals_a_hand_computation(loss_type, beta):
    logps, old, ref, adv, mask = _fixed_group()
    options = GRPOConfig(
        loss_type=loss_type, beta=beta, epsilon=0.2, epsilon_high=0.28, max_new_tokens=7
    )
    loss, stats = grpo_loss(logps, old, adv, mask, options, ref)
    per_row, total, count, clipped = [], 0.0, 0, 0
    for i in range(3):
        row, n = 0.0, 0
        for t in range(5):
            if not mask[i, t]:
                continue
            ratio = math.exp(logps[i, t] - old[i, t])
            a = float(adv[i])
            term = -min(ratio * a, min(max(ratio, 0.8), 1.28) * a)
            d = float(ref[i, t] - logps[i, t])
            term += beta * (math.exp(d) - d - 1)
            clipped += (ratio < 0.8 and a < 0) or (ratio > 1.28 and a > 0)
            row, n = row + term, n + 1
        per_row.append(row / n)
        total, count = total + row, count + n
    expected = {"dapo": total / count, "grpo": sum(per_row) / 3, "dr_grpo": total / (3 * 7)}
    assert float(loss) == pytest.approx(expected[loss_type], rel=1e-5)
    assert float(stats["clip_ratio"]) == pytest.approx(clipped / count)
    assert 0 < clipped < count  # the fixture exercises both sides of the clip
    assert ("kl" in stats) == (beta > 0)


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])
def test_loss_on_the_rows_with_signal_equals_the_loss_on_every_row(loss_type):
    """The module drops completions with advantage 0 from the training forward (beta = 0): the
    loss and its gradient must not change when the normalisers still count them."""
    logps, old, _, adv, mask = _fixed_group()
    options = GRPOConfig(loss_type=loss_type, max_new_tokens=7)
    full_logps = logps.clone().requires_grad_()
    full, _ = grpo_loss(full_logps, old, adv, mask, options)
    full.backward()
    rows = adv != 0
    part_logps = logps[rows].clone().requires_grad_()
    part, _ = grpo_loss(part_logps, old[rows], adv[rows], mask[rows], options, None, 3, mask.sum())
    part.backward()
    assert float(part) == pytest.approx(float(full), rel=1e-6)
    torch.testing.assert_close(part_logps.grad, full_logps.grad[rows])


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logps_and_entropy_are_those_of_the_sampling_distribution(temperature):
    logits = torch.randn(2, 3, 11)
    targets = torch.randint(0, 11, (2, 3))
    logp, entropy = token_logps(logits, targets, temperature)
    ref = torch.distributions.Categorical(logits=logits / temperature)
    torch.testing.assert_close(logp, ref.log_prob(targets))
    torch.testing.assert_close(entropy, ref.entropy())


def test_rewards_format_and_overlong():
    assert well_formed("<think>\n1 + 1 = 2\n</think>\nAnswer: 2")
    assert not well_formed("<think>\n</think>\nAnswer: 2\nAnswer: 3")  # two answer lines
    assert not well_formed("1 + 1 = 2\n</think>\nAnswer: 2")  # no opening tag
    assert not well_formed("<think>\n2\n</think>\n")  # no answer
    assert [overlong(n, 100, 20) for n in (50, 80, 90, 100)] == [0.0, 0.0, -0.5, -1.0]
    reference = ("12 + 30 = 42", "42 - 2 = 40")
    assert working("<think>\n12 + 30 = 42\n42 - 2 = 40\n</think>\nAnswer: 40", reference) == 1.0
    assert working("<think>\n42 - 2 = 40\n12 + 30 = 42\n</think>\nAnswer: 40", reference) == 0.5
    assert working("<think>\n12 + 30 = 43\n</think>\nAnswer: 41", reference) == 0.0
    assert (
        working("42 - 2 = 40\nAnswer: 40", reference) == 0.5
    )  # no tags: the whole text is the head


def test_step_prompts_depend_on_the_step_alone():
    options = GRPOConfig(prompts_per_step=3, num_iterations=2)
    a = StepPrompts(10, options, seed=0, start=lambda: 0)
    b = StepPrompts(10, options, seed=0, start=lambda: 5)
    first = [x.tolist() for x, _ in zip(a, range(12), strict=False)]
    resumed = [x.tolist() for x, _ in zip(b, range(7), strict=False)]
    assert resumed == first[5:]
    assert first[0] == first[1] and first[2] != first[0]  # a rollout serves num_iterations steps
    seen = sum(first[::2][:3], [])  # the first pass: 9 distinct prompts of 10
    assert len(set(seen)) == 9
    ranks = [
        StepPrompts(10, options, 0, lambda: 0, rank=r, world=2).indices(0).tolist() for r in (0, 1)
    ]
    assert not set(ranks[0]) & set(ranks[1])


def _grpo(make_cfg, run, *overrides, run_dir=None):
    base = ("stage=grpo", "debug=fast", f"model.init_from={run}", "logger=csv", "export.hf=false")
    return make_cfg(*base, "eval.at_end=false", *overrides, run_dir=run_dir)


def test_grpo_raises_a_toy_reward(make_cfg, pretrained, tmp_path):
    run, _ = pretrained
    cfg = _grpo(
        make_cfg,
        run,
        "grpo.reward_fn=test_grpo:sevens",
        "grpo.num_generations=8",
        "trainer.max_steps=24",
        "trainer.val_check_interval=24",
        "optim.lr=3e-3",
        "eval.during_training.num_problems=0",
    )
    train(cfg)
    import csv

    with open(tmp_path / "run" / "csv" / "metrics.csv") as f:
        rewards = [
            float(r["grpo/reward_mean"]) for r in csv.DictReader(f) if r.get("grpo/reward_mean")
        ]
    assert len(rewards) == 24
    first, last = sum(rewards[:6]) / 6, sum(rewards[-6:]) / 6
    assert last > first + 0.3, (
        rewards
    )  # seen: 0.12 -> 0.72 (a seeded run; the margin absorbs thread-count noise)


def test_grpo_resume_with_reused_rollouts_equals_uninterrupted(make_cfg, pretrained, tmp_path):
    run, _ = pretrained
    extra = (
        "grpo.reward_fn=test_grpo:sevens",
        "grpo.num_iterations=2",
        "logger=none",
        "optim.lr=1e-3",
    )
    full = train(_grpo(make_cfg, run, *extra, run_dir=tmp_path / "full"))
    split = tmp_path / "split"
    train(_grpo(make_cfg, run, *extra, run_dir=split), callbacks=[StopAfterValidation(5)])
    ckpt = torch.load(split / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 5 and ckpt["grpo"]["rollout"]["step"] == 4  # mid-reuse
    resumed = train(_grpo(make_cfg, run, *extra, "ckpt_path=last", run_dir=split))
    assert resumed["val/bpb"] == pytest.approx(full["val/bpb"], abs=1e-6)
    assert resumed["tokens"] == full["tokens"]
    a = torch.load(tmp_path / "full" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    b = torch.load(split / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6, msg=name)


def test_grpo_trains_moe_under_fp8_with_a_kl_reference(make_cfg, pretrained):
    run, _ = pretrained  # debug=fast's default model is the MoE
    cfg = _grpo(
        make_cfg,
        run,
        "precision=fp8_blockwise",
        "grpo.reward_fn=test_grpo:sevens",
        "grpo.beta=0.1",
        "trainer.max_steps=4",
        "trainer.val_check_interval=2",
        "optim.lr=1e-3",
    )
    metrics = train(cfg)
    assert metrics["moe/max_vio"] >= 0 and math.isfinite(metrics["train/loss"])
    assert metrics["grpo/kl"] >= 0


@pytest.mark.parametrize(
    "override, message",
    [
        ("grpo.num_generations=1", "num_generations=1 must be >= 2"),
        ("grpo.max_new_tokens=250", "exceed the window"),
        ("grpo.reference_from=/tmp", "grpo.beta=0"),
        ("grpo.reward_fn=nowhere:fn", "not an importable function"),
        ("grpo.corpus_config={digits:3}", "unknown key(s) ['digits']"),
        ("grpo.loss_type=ppo", "not one of ['dapo', 'grpo', 'dr_grpo']"),
        ("trainer.accumulate_grad_batches=2", "runs on one device without gradient accumulation"),
    ],
)
def test_bad_grpo_input_is_refused_before_the_run(make_cfg, pretrained, override, message):
    run, _ = pretrained
    with pytest.raises(ValueError, match=None) as err:
        train(_grpo(make_cfg, run, override))
    assert message in str(err.value)


def test_grpo_needs_a_start(make_cfg):
    with pytest.raises(ValueError, match="model.init_from"):
        train(make_cfg("stage=grpo", "debug=fast", "logger=none"))


@pytest.mark.parametrize("fn, limit", [("raises", 0), ("not_a_number", 2)])
def test_failing_reward_groups_are_counted_then_stop_the_run(make_cfg, pretrained, fn, limit):
    run, _ = pretrained
    cfg = _grpo(make_cfg, run, f"grpo.reward_fn=test_grpo:{fn}", f"grpo.max_failed_groups={limit}")
    with pytest.raises(ValueError, match=f"{limit + 1} groups failed their reward") as err:
        train(cfg)
    assert "broken reward" in str(err.value) or "'1'" in str(err.value)
