"""`stage=grpo`: Group Relative Policy Optimization with verifiable rewards (DeepSeekMath,
arXiv 2402.03300; DeepSeek-R1, arXiv 2501.12948), on the model, Trainer, precision, loggers,
checkpoints and export of the other stages.

Every `num_iterations` steps the policy samples G = `num_generations` completions for each of
the step's P prompts (the batched KV-cached sampler, fp32, seeded by step and row so a resumed run
samples what it would have); each completion gets a reward (`training/rewards.py`), and its
advantage is its reward minus its group's mean, divided by the group's std (`scale_rewards=group`,
Bessel-corrected, + 1e-4, as TRL) or not (`none`, Dr. GRPO arXiv 2503.20783). Per completion token,
with ratio ρ = π / π_old (1 in value when a rollout is used once: π_old is π detached):
    ℓ_t = -min(ρ A, clip(ρ, 1 - ε, 1 + ε_high) A) + β k3_t,   k3 = e^(ref - π) - (ref - π) - 1
aggregated as `loss_type`:
    dapo     Σ ℓ over every completion token of the step / their count (token-level mean, DAPO
             arXiv 2503.14476; under DDP the count is summed over ranks)
    grpo     mean over completions of each one's token mean
    dr_grpo  Σ ℓ / (completions x max_new_tokens)
A completion with advantage 0 adds nothing when β = 0, so only completions with signal run the
training forward (the normalisers still count every completion). With β = 0 no reference model is
built. MoE: the bias update counts the tokens of that training forward (prompt and completion of
the completions with signal; padding too) — the tokens the policy is trained on; the sampling runs
in eval mode and counts nothing.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass

import torch

from tinyreason.checkpoints import load_init_weights
from tinyreason.evaluation import Item
from tinyreason.sampling import SamplingConfig, sample
from tinyreason.speculative import SpeculativeStats, speculative_sample
from tinyreason.training.grpo_data import GRPOConfig
from tinyreason.training.rewards import (
    RewardError,
    load_reward_fn,
    overlong,
    score,
    well_formed,
    working,
)
from tinyreason.training.sft import SFTModule


def group_advantages(
    rewards_R: torch.Tensor, group_size: int, scale_rewards: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages [R], each row's group std [R]) of rewards [R] in consecutive groups."""
    grouped = rewards_R.view(-1, group_size)
    std = grouped.std(dim=1, keepdim=True).expand_as(grouped)  # Bessel, as TRL's nanstd
    advantages = grouped - grouped.mean(dim=1, keepdim=True)
    if scale_rewards == "group":
        advantages = advantages / (std + 1e-4)
    # A group of equal rewards has no signal: exactly 0 (the mean of eight 0.3s is not 0.3 in
    # floating point, which left advantages of 3e-4 and std 3e-8 that isclose(0) missed).
    flat = (grouped == grouped[:, :1]).all(dim=1, keepdim=True)
    advantages = advantages.masked_fill(flat, 0.0)
    std = std.masked_fill(flat, 0.0)
    return advantages.flatten(), std.flatten()


def grpo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    options: GRPOConfig,
    ref_logps: torch.Tensor | None = None,
    num_rows: int | None = None,
    num_tokens: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(loss, stats) of per-token log-probs [R, T] of the completions under the policy, the
    sampling policy and the reference, advantages [R] and the completion mask [R, T].
    `num_rows` / `num_tokens`: what the mean divides by when these rows are a subset of the step's
    (default: these rows, their masked tokens)."""
    mask = mask.to(logps.dtype)
    num_rows = logps.shape[0] if num_rows is None else num_rows
    num_tokens = mask.sum() if num_tokens is None else num_tokens
    eps_low = options.epsilon
    eps_high = options.epsilon if options.epsilon_high is None else options.epsilon_high
    ratio = torch.exp(logps - old_logps)
    A = advantages[:, None]
    per_token = -torch.min(ratio * A, torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * A)
    stats: dict[str, torch.Tensor] = {}
    if options.beta != 0:
        delta = ref_logps - logps
        kl = torch.exp(delta) - delta - 1
        per_token = per_token + options.beta * kl
        stats["kl"] = _masked_mean(kl.detach(), mask)
    summed = per_token * mask
    if options.loss_type == "grpo":
        loss = (summed.sum(-1) / mask.sum(-1).clamp(min=1)).sum() / max(num_rows, 1)
    elif options.loss_type == "dapo":
        loss = summed.sum() / torch.as_tensor(num_tokens, dtype=logps.dtype).clamp(min=1)
    else:  # dr_grpo
        loss = summed.sum() / (max(num_rows, 1) * options.max_new_tokens)
    clipped = ((ratio < 1 - eps_low) & (A < 0)) | ((ratio > 1 + eps_high) & (A > 0))
    stats["clip_ratio"] = _masked_mean(clipped.to(mask.dtype), mask)
    return loss, stats


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def token_logps(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(target) [R, T], entropy [R, T], no gradient) in fp32, of softmax(logits / T): the
    distribution the rollouts were sampled from (as TRL)."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    picked = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():  # a logged statistic: keep no [R, T, V] tensor for backward
        entropy = -(logp.exp() * logp).sum(-1)
    return picked, entropy


@dataclass
class Rollout:
    """One generation's completions, ready for `num_iterations` training steps."""

    step: int  # the step that sampled it
    inputs: torch.Tensor  # [R', L-1] prompt + completion of the rows with signal (R' <= R)
    targets: torch.Tensor  # [R', L-1]
    mask: torch.Tensor  # [R', L-1] the completion tokens that count
    advantages: torch.Tensor  # [R']
    num_rows: int  # R: every completion of the step
    num_tokens: float  # completion tokens of every completion of the step (masked)
    old_logps: torch.Tensor | None  # [R', L-1] num_iterations > 1: the sampling policy's
    ref_logps: torch.Tensor | None  # [R', L-1] beta > 0
    stats: dict[str, float]

    def state(self) -> dict:
        return dataclasses.asdict(self)

    def to(self, device: torch.device) -> Rollout:
        moved = {
            f.name: getattr(self, f.name).to(device)
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return dataclasses.replace(self, **moved)


class GRPOModule(SFTModule):
    def __init__(
        self,
        model: dict,
        optim: dict,
        precision: dict | None = None,
        loss_flag: int | None = None,
        bos_id: int | None = None,
        grpo: dict | None = None,
        eos_id: int | None = None,
        pad_id: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(model, optim, precision, loss_flag, bos_id)
        self.options = GRPOConfig(**(grpo or {}))
        self.eos_id, self.pad_id, self.seed = eos_id, pad_id, seed
        self.reward_fn = load_reward_fn(self.options.reward_fn) if self.options.reward_fn else None
        self.reference = None
        self.rollout: Rollout | None = None
        self.failed_groups = 0
        self.trained_tokens = 0
        self.last_step_tokens = 0  # what the Throughput callback counts for this step
        self.pool: list[Item] = []
        self.prompts: list[list[int]] = []
        self.references: list[tuple[str, ...]] = []
        self.tokenizer = None

    @classmethod
    def from_run(cls, run, datamodule) -> GRPOModule:
        o: GRPOConfig = run.stage_options
        if run.init_from is None and run.resume is None:
            raise ValueError(
                "stage=grpo starts from a trained model: model.init_from=<run dir | .ckpt | HF folder>"
            )
        t = run.trainer
        if t.devices not in (1, "1") or t.accumulate_grad_batches != 1:
            raise ValueError(
                "stage=grpo runs on one device without gradient accumulation (trainer.devices=1, "
                f"accumulate_grad_batches=1; got {t.devices}, {t.accumulate_grad_batches}): "
                "steps without signal skip their update, which "
                "DDP cannot do, and a step's rollout is its prompts; raise grpo.prompts_per_step "
                "for a larger batch"
            )
        tokenizer = datamodule.prepared.tokenizer
        module = super().from_run(
            run,
            datamodule,
            grpo=dataclasses.asdict(o),
            eos_id=tokenizer.eos_token_id,
            pad_id=tokenizer.pad_token_id or 0,
            seed=run.seed,
        )
        module.pool, module.prompts = datamodule.pool, datamodule.prompts
        module.references, module.tokenizer = datamodule.references, tokenizer
        if o.beta > 0:
            module.configure_model()
            if o.reference_from is not None:
                load_init_weights(module.reference, o.reference_from)
            else:
                module.reference.load_state_dict(module.model.state_dict())  # the starting weights
        return module

    def configure_model(self) -> None:
        if self.model is not None:
            return
        super().configure_model()
        if self.options.beta > 0:
            self.reference = copy.deepcopy(self.model).requires_grad_(False)

    @property
    def tokens_seen(self) -> int:
        return self.trained_tokens

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["grpo"] = {
            "rollout": self.rollout.state() if self.rollout is not None else None,
            "failed_groups": self.failed_groups,
            "trained_tokens": self.trained_tokens,
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("grpo") or {}
        self.rollout = Rollout(**state["rollout"]) if state.get("rollout") else None
        self.failed_groups = state.get("failed_groups", 0)
        self.trained_tokens = state.get("trained_tokens", 0)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor | None:
        o, step = self.options, self.global_step
        first = step - step % o.num_iterations
        if self.rollout is None or self.rollout.step != first:
            self.rollout = self._roll_out(batch.tolist(), first)
        r = self.rollout = self.rollout.to(self.device)  # a resume restored it on CPU
        self.log_dict({f"grpo/{k}": v for k, v in r.stats.items()})
        self.log("lr", self.lr_schedulers().get_last_lr()[0])
        active = self.trainer.strategy.reduce(
            torch.tensor(float(r.inputs.shape[0]), device=self.device), reduce_op="sum"
        )
        self.last_step_tokens = int(r.inputs.numel())
        if active == 0:  # no completion with signal on any rank: nothing to learn from
            self.log("tokens", float(self.trained_tokens))
            return None
        out = self.model(r.inputs)
        logps, entropy = token_logps(out.logits, r.targets, o.temperature)
        old = r.old_logps if r.old_logps is not None else logps.detach()
        world = self.trainer.world_size
        num_tokens = (
            self.trainer.strategy.reduce(
                torch.tensor(r.num_tokens, device=self.device), reduce_op="sum"
            )
            / world
        )  # DDP averages the ranks' gradients: a global token mean
        loss, stats = grpo_loss(
            logps, old, r.advantages, r.mask, o, r.ref_logps, r.num_rows, num_tokens
        )
        loss = loss + out.balance
        self.trained_tokens += self.last_step_tokens * world
        self.log("train/loss", loss, prog_bar=True)
        self.log_dict({f"grpo/{k}": v for k, v in stats.items()})
        self.log("grpo/entropy", (entropy.detach() * r.mask).sum() / r.mask.sum().clamp(min=1))
        self.log("tokens", float(self.trained_tokens))
        return loss

    @torch.no_grad()
    def _roll_out(self, indices: list[int], step: int) -> Rollout:
        o, model = self.options, self.model
        G, device = o.num_generations, self.device
        items = [self.pool[i] for i in indices for _ in range(G)]
        references = [self.references[i] for i in indices for _ in range(G)]
        prompts = [self.prompts[i] for i in indices for _ in range(G)]
        rank, R = self.global_rank, len(prompts)
        first = (self.trainer.world_size * step + rank) * R  # one seed per completion ever drawn
        seeds = [self.seed * 1_000_003 + first + j for j in range(R)]
        config = SamplingConfig(o.max_new_tokens, o.temperature, o.top_p, o.top_k)
        start = time.perf_counter()
        drafts = SpeculativeStats() if o.speculative and model.config.mtp.depth else None
        special = dict(eos_token_id=self.eos_id, pad_token_id=self.pad_id, seeds=seeds)
        with torch.autocast(device.type, enabled=False):
            if drafts is not None:  # speculative sampling: the same distribution
                completions = speculative_sample(model, prompts, config, **special, stats=drafts)
            else:
                completions = sample(model, prompts, config, **special, compile=o.compile)
        sampling_s = time.perf_counter() - start
        model.train()
        texts = [self.tokenizer.decode(c, skip_special_tokens=True) for c in completions]
        truncated = [c[-1] != self.eos_id for c in completions]
        correct, rewards, failed = self._rewards(items, references, texts, completions)
        rewards_R = torch.tensor(rewards, device=device)
        advantages, std = group_advantages(rewards_R, G, o.scale_rewards)
        advantages = advantages.masked_fill(failed, 0.0)
        ids, mask = _sequences(prompts, completions, self.pad_id, device)
        keep = mask.clone()
        keep[failed] = False
        if o.mask_truncated:
            keep[torch.tensor(truncated, device=device)] = False
        rows = (keep.any(-1) & ((advantages != 0) | (o.beta > 0))).nonzero().squeeze(-1)
        inputs, targets = ids[rows, :-1], ids[rows, 1:]
        old_logps = ref_logps = None
        if o.num_iterations > 1 and len(rows):
            old_logps = self._logps(model, inputs, targets)
        if o.beta > 0 and len(rows):
            ref_logps = self._logps(self.reference, inputs, targets)
        lengths = torch.tensor([len(c) for c in completions], dtype=torch.float)
        zero_std = torch.isclose(std, torch.zeros_like(std)).view(-1, G)[:, 0]
        stats = {
            "reward_mean": float(rewards_R.mean()),
            "reward_std": float(std.view(-1, G)[:, 0].mean()),
            "frac_reward_zero_std": float(zero_std.float().mean()),
            "accuracy": sum(correct) / R,
            "completion_length": float(lengths.mean()),
            "truncated": sum(truncated) / R,
            "failed_groups": float(self.failed_groups),
            "trained_rows": float(len(rows)),
            "sampling_tokens_per_s": float(lengths.sum()) / max(sampling_s, 1e-9),
            **({"draft_acceptance": drafts.acceptance_rate} if drafts is not None else {}),
        }
        return Rollout(
            step=step,
            inputs=inputs,
            targets=targets,
            mask=keep[rows],
            advantages=advantages[rows],
            num_rows=R,
            num_tokens=float(keep.sum()),
            old_logps=old_logps,
            ref_logps=ref_logps,
            stats=stats,
        )

    def _rewards(
        self,
        items: list[Item],
        references: list[tuple[str, ...]],
        texts: list[str],
        completions: list[list[int]],
    ) -> tuple[list[bool], list[float], torch.Tensor]:
        """(correct per row, reward per row, failed-group flag per row [R]). A group whose reward
        function failed on any completion is left out; past `max_failed_groups` the run stops."""
        o, G = self.options, self.options.num_generations
        correct = [item.check(text) for item, text in zip(items, texts, strict=True)]
        rewards, failed = [], []
        for start in range(0, len(items), G):
            group = []
            try:
                for j in range(start, start + G):
                    item, text = items[j], texts[j]
                    r = (
                        score(self.reward_fn, item.question, text, item.gold)
                        if self.reward_fn is not None
                        else float(correct[j])
                    )
                    if o.format_reward:
                        r += o.format_reward * well_formed(text)
                    if o.step_reward:
                        r += o.step_reward * working(text, references[j])
                    if o.overlong_penalty:
                        r += o.overlong_penalty * overlong(
                            len(completions[j]), o.max_new_tokens, o.overlong_buffer
                        )
                    group.append(r)
            except RewardError as err:
                self.failed_groups += 1
                if self.failed_groups > o.max_failed_groups:
                    raise ValueError(
                        f"{self.failed_groups} groups failed their reward (grpo.max_failed_groups="
                        f"{o.max_failed_groups}); the last: {err}"
                    ) from err
                group = [0.0] * G
                failed += [True] * G
            else:
                failed += [False] * G
            rewards += group
        return correct, rewards, torch.tensor(failed, device=self.device)

    def _logps(self, model, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        was_training = model.training
        model.eval()  # no MoE counting, no dropout
        try:
            return token_logps(model(inputs).logits, targets, self.options.temperature)[0]
        finally:
            model.train(was_training)


def _sequences(
    prompts: list[list[int]], completions: list[list[int]], pad: int, device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt + completion right-padded [R, L], mask [R, L-1] of the targets that are
    completion tokens)."""
    L = max(len(p) + len(c) for p, c in zip(prompts, completions, strict=True))
    ids = torch.full((len(prompts), L), pad, dtype=torch.long)
    mask = torch.zeros(len(prompts), L - 1, dtype=torch.bool)
    for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        ids[i, : len(p) + len(c)] = torch.tensor(p + c)
        mask[i, len(p) - 1 : len(p) + len(c) - 1] = True
    return ids.to(device), mask.to(device)
