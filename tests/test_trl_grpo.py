"""TRL's GRPOTrainer on our exports: our GRPO advantages (scale_rewards group and none) and loss
(dapo, grpo, dr_grpo; value and gradient) equal `GRPOTrainer`'s on the same completions, and
`GRPOTrainer` trains an export with our rewards on prompts rendered by our chat template."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_trl import PROBLEMS, models

from tinyreason.data import synthetic
from tinyreason.data.sources import solution
from tinyreason.model import CausalLM
from tinyreason.tokenizer import EOS, TokenizerConfig, chat_document, chat_prompt, train_bpe
from tinyreason.training.grpo import group_advantages, grpo_loss, token_logps
from tinyreason.training.grpo_data import GRPOConfig
from tinyreason.training.rewards import well_formed

trl = pytest.importorskip("trl")


@pytest.fixture(scope="module")
def tok():  # test_trl's
    docs = [chat_document(p.question, solution(p)) for p in PROBLEMS]
    return train_bpe(docs, TokenizerConfig(vocab_size=400))


def correct_and_formatted(prompts, completions, idx, **kwargs) -> list[float]:
    """Our rewards as a TRL reward function: the answer checker + the format check (0, 1 or 2)."""
    texts = [c[-1]["content"] for c in completions]  # conversational: one assistant message
    return [
        float(synthetic.check(PROBLEMS[i], t)) + float(well_formed(t))
        for i, t in zip(idx, texts, strict=True)
    ]


def grpo_args(tmp_path, **kwargs):
    """One process, no accumulation (gradient_accumulation_steps = steps_per_generation = 1): TRL's
    dapo normaliser, num_items_in_batch / num_processes x accumulation / steps_per_generation, is
    then the completion tokens of the batch, what ours divides by."""
    from trl import GRPOConfig as TRLConfig

    return TRLConfig(
        output_dir=str(tmp_path / "grpo"),
        report_to="none",
        use_cpu=True,
        bf16=False,
        save_strategy="no",
        **kwargs,
    )


def prompt_rows(problems) -> list[dict]:
    return [
        {"prompt": [{"role": "user", "content": p.question}], "idx": PROBLEMS.index(p)}
        for p in problems
    ]


G = 4  # completions per prompt


@dataclasses.dataclass
class GRPOCase:
    policy: CausalLM
    hf: object  # the export, loaded by transformers
    tokenizer: object  # the export's
    problems: list
    prompt_ids: list[list[int]]  # [R] G rows a prompt
    completion_ids: list[list[int]]  # [R]
    mask: torch.Tensor  # [R, C] the completion tokens
    old: torch.Tensor  # [R, C] the sampling policy's log-probs (0 outside the mask)
    ref: torch.Tensor  # [R, C] the reference's


@pytest.fixture(scope="module")
def grpo_case(tok, tmp_path_factory):
    """Our policy and its export (with the export's tokenizer: train_bpe's in-memory one drops the
    think tags on decode(skip_special_tokens=True), test_evaluation's xfail), three prompts of
    different lengths (TRL left-pads them) with fixed completions: rewards [2, 1, 1, 0], [1, 2, 2, 1]
    and [0, 0, 0, 0] (a group of zero std), and the sampling policy's and the reference's log-probs
    moved from the policy's so that ratios leave the clip range and the KL is not zero."""
    from transformers import AutoTokenizer

    tmp_path = tmp_path_factory.mktemp("grpo_case")
    policy, _, hf, _ = models(tok, tmp_path, kind="dense_mla")
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "policy")
    encode = lambda text: hf_tok.encode(text, add_special_tokens=False)  # noqa: E731
    problems = PROBLEMS[:3]

    def texts(p):  # rewards 2 (right), 1 (a wrong answer), 1 (no think block), 0 (cut short)
        wrong = solution(p).replace(f": {p.answer}", f": {p.answer}1")
        return [solution(p) + EOS, wrong + EOS, f"Answer: {p.answer}{EOS}", solution(p)[:20]]

    a, b = texts(problems[0]), texts(problems[1])
    cut = [solution(problems[2])[:n] for n in (12, 20, 30, 40)]
    completions = [a, [b[1], b[0], b[0], b[2]], cut]
    prompt_ids = [encode(chat_prompt(p.question)) for p in problems for _ in range(G)]
    completion_ids = [encode(text) for group in completions for text in group]
    mask = torch.zeros(len(completion_ids), max(map(len, completion_ids)), dtype=torch.bool)
    for i, ids in enumerate(completion_ids):
        mask[i, : len(ids)] = True
    with torch.no_grad():
        logps = completion_logps(policy, prompt_ids, completion_ids, mask.shape[1])
    g = torch.Generator().manual_seed(0)
    old = (logps + torch.empty(logps.shape).uniform_(-0.5, 0.5, generator=g)) * mask
    ref = (logps - 0.3 * torch.rand(logps.shape, generator=g)) * mask
    return GRPOCase(policy, hf, hf_tok, problems, prompt_ids, completion_ids, mask, old, ref)


def completion_logps(model, prompt_ids, completion_ids, width: int) -> torch.Tensor:
    """[R, width] our log-probs of each completion token, one row at a time (no padding)."""
    rows = []
    for p, c in zip(prompt_ids, completion_ids, strict=True):
        ids = torch.tensor([p + c])
        logps, _ = token_logps(model(ids[:, :-1]).logits, ids[:, 1:])
        rows.append(torch.nn.functional.pad(logps[0, len(p) - 1 :], (0, width - len(c))))
    return torch.stack(rows)


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])
@pytest.mark.parametrize("scale_rewards", ["group", "none"])
def test_our_grpo_advantages_and_loss_equal_trl(grpo_case, tmp_path, scale_rewards, loss_type):
    from datasets import Dataset
    from trl import GRPOTrainer

    case = grpo_case
    policy, mask, old, ref = case.policy, case.mask, case.old, case.ref
    prompt_ids, completion_ids, width = case.prompt_ids, case.completion_ids, mask.shape[1]
    options = GRPOConfig(
        num_generations=G,
        loss_type=loss_type,
        scale_rewards=scale_rewards,
        beta=0.04,
        epsilon=0.2,
        epsilon_high=0.28,
        max_new_tokens=width + 7,  # dr_grpo's constant: not the longest completion
    )
    args = grpo_args(
        tmp_path,
        num_generations=G,
        per_device_train_batch_size=len(prompt_ids),
        max_completion_length=options.max_new_tokens,
        loss_type=loss_type,
        scale_rewards=scale_rewards,
        beta=options.beta,
        epsilon=options.epsilon,
        epsilon_high=options.epsilon_high,
        # TRL's default multiplies the KL by the ratio (DeepSeek-V3.2's unbiased estimate); ours is
        # DeepSeekMath's k3 alone: equal in value on-policy, not in gradient, nor here (ratio != 1)
        use_bias_correction_kl=False,
    )
    rows = prompt_rows(case.problems)

    def rollout(prompts, trainer):  # TRL's hook for outside generation: our fixed completions
        assert prompts == [r["prompt"] for r in rows for _ in range(G)]
        return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "logprobs": None}

    trainer = GRPOTrainer(
        model=case.hf,
        reward_funcs=correct_and_formatted,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=case.tokenizer,
        rollout_func=rollout,
    )
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # what Trainer's loop sets: one micro-batch
    with torch.no_grad():
        inputs = trainer._generate_and_score_completions([r for r in rows for _ in range(G)])
    rewards = torch.tensor(trainer._logs["rewards"]["correct_and_formatted"])
    assert rewards.tolist() == [2, 1, 1, 0, 1, 2, 2, 1, 0, 0, 0, 0]
    advantages, _ = group_advantages(rewards, G, scale_rewards)
    torch.testing.assert_close(inputs["advantages"], advantages, rtol=1e-6, atol=1e-7)
    assert (inputs["prompt_mask"] == 0).any()  # left padding
    assert torch.equal(inputs["completion_mask"].bool(), mask)
    assert inputs["num_items_in_batch"] == mask.sum()
    inputs["old_per_token_logps"], inputs["ref_per_token_logps"] = old, ref

    theirs = trainer._compute_loss(trainer.model, inputs)
    logps = completion_logps(policy, prompt_ids, completion_ids, width)
    ours, stats = grpo_loss(logps, old, advantages, mask, options, ref)
    assert 0 < stats["clip_ratio"] < 0.5 and stats["kl"] > 0
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)
    metrics = trainer._metrics["train"]
    assert metrics["clip_ratio/region_mean"][-1] == pytest.approx(
        float(stats["clip_ratio"]), abs=1e-6
    )
    assert metrics["kl"][-1] == pytest.approx(float(stats["kl"]), rel=1e-5)
    # and the gradient: our parameters against the export's (dense: HF's name is ours under model.)
    names = [n for n, _ in policy.named_parameters() if not n.startswith("mtp.")]
    hf_params = dict(trainer.model.named_parameters())
    ours_grad = torch.autograd.grad(ours, [policy.get_parameter(n) for n in names])
    theirs_grad = torch.autograd.grad(
        theirs, [hf_params[n if n == "lm_head.weight" else f"model.{n}"] for n in names]
    )
    for name, a, b in zip(names, ours_grad, theirs_grad, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)


def test_trl_grpo_trainer_trains_our_export_with_our_rewards(tok, tmp_path):
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import GRPOTrainer

    _, _, hf, _ = models(tok, tmp_path, kind="dense_mla")
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "policy")
    calls = []

    def ours(prompts, completions, completion_ids, idx, **kwargs):
        calls.append((prompts, completions, completion_ids, idx))
        return correct_and_formatted(prompts, completions, idx)

    def digits(completions, **kwargs):
        """A dense toy reward: an untrained model never answers, so ours is 0 and gives no signal."""
        texts = [c[-1]["content"] for c in completions]
        return [sum(ch.isdigit() for ch in t) / max(len(t), 1) for t in texts]

    ours.__name__ = "correct_and_formatted"  # TRL logs a reward under its function's name
    rows = prompt_rows(PROBLEMS[:8])
    args = grpo_args(
        tmp_path,
        num_generations=G,
        per_device_train_batch_size=2 * G,
        max_completion_length=24,
        max_steps=3,
        learning_rate=1e-3,
        logging_steps=1,
        seed=0,
    )
    trainer = GRPOTrainer(
        model=hf,
        reward_funcs=[ours, digits],
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=hf_tok,
    )
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    moved = [n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])]
    assert moved == list(before)

    # TRL renders a prompt with our chat template: the ids our sampler prompts with
    prompt_ids, _, _ = trainer._tokenize_prompts([r["prompt"] for r in rows])
    encode = lambda text: hf_tok.encode(text, add_special_tokens=False)  # noqa: E731
    assert prompt_ids == [encode(chat_prompt(p.question)) for p in PROBLEMS[:8]]
    assert len(calls) == 3  # one generation a step, 2 prompts x G completions
    eos = hf_tok.eos_token_id
    for prompts, completions, completion_ids, idx in calls:
        assert len(completions) == 2 * G and idx == [idx[0]] * G + [idx[G]] * G
        for prompt, i, completion, ids in zip(
            prompts, idx, completions, completion_ids, strict=True
        ):
            assert prompt == [{"role": "user", "content": PROBLEMS[i].question}]
            text = hf_tok.decode(ids, skip_special_tokens=True)
            assert completion == [{"role": "assistant", "content": text}]
            assert 0 < len(ids) <= 24 and eos not in ids[:-1]  # cut at the first eos
    # the last generation's advantages: ours from the summed rewards
    rewards = torch.tensor(trainer._logs["rewards"]["correct_and_formatted"])
    rewards += torch.tensor(trainer._logs["rewards"]["digits"])
    advantages, _ = group_advantages(rewards, G, "group")
    assert advantages.abs().sum() > 0
    torch.testing.assert_close(torch.tensor(trainer._logs["advantages"]), advantages)
