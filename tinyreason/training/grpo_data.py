"""The data of `stage=grpo`: the `grpo.*` keys, the prompt pool and its DataModule.

Prompts are problems with a checkable answer: the training split of the embedded corpus (the data
group's corpus config with `grpo.corpus_config` applied on top, e.g. `{max_digits: 5}` or
`{ood: true}` for problems harder than pretraining saw; the held-out test problems stay disjoint,
the split is a hash of each problem's key) and `grpo.files` (jsonl `question` / `answer`). Step s
trains on the prompts of generation g = s // num_iterations: positions g*P .. g*P+P-1 of a seeded
order of the pool (a new order per pass), so the prompts of a step depend on the step alone and a
resumed run continues with exactly the prompts it would have seen.

Validation is the SFT stage's: the held-out conversations (val/bpb: how far the policy drifts from
the solutions' template) and greedy exact match on held-out problems (val/exact_match).
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass

import torch
from torch.utils.data import IterableDataset

from tinyreason.data import synthetic
from tinyreason.data.conversations import ConversationsCorpus, SFTConfig
from tinyreason.data.datamodule import SFTDataModule, _stage_base
from tinyreason.data.sources import Corpus
from tinyreason.evaluation import Item, file_items, problem_item
from tinyreason.sampling import prompt_ids
from tinyreason.training.rewards import load_reward_fn

LOSS_TYPES = ("dapo", "grpo", "dr_grpo")
SCALE_REWARDS = ("group", "none")


@dataclass(frozen=True)
class GRPOConfig:
    """The `grpo.*` keys of `stage=grpo` (conf/stage/grpo.yaml documents each)."""

    num_generations: int = 8
    prompts_per_step: int = 4
    max_new_tokens: int = 160
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    loss_type: str = "dapo"
    scale_rewards: str = "group"
    beta: float = 0.0
    reference_from: str | None = None  # beta > 0: the reference's weights (default: the start)
    epsilon: float = 0.2
    epsilon_high: float | None = None
    num_iterations: int = 1
    mask_truncated: bool = False
    speculative: bool = True  # with model.mtp.depth >= 1: rollouts by speculative sampling
    compile: bool = False  # plain rollouts: decode steps through torch.compile
    format_reward: float = 0.0
    step_reward: float = 0.0
    overlong_penalty: float = 0.0
    overlong_buffer: int = 32
    reward_fn: str | None = None
    max_failed_groups: int = 10
    corpus: bool = True
    corpus_config: dict | None = None  # CorpusConfig keys changed for the prompts
    files: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "files", tuple(self.files))
        object.__setattr__(self, "corpus_config", dict(self.corpus_config or {}))
        if self.num_generations < 2:
            raise ValueError(
                f"grpo.num_generations={self.num_generations} must be >= 2: the advantage is a "
                "completion's reward against its group's mean"
            )
        for name in ("prompts_per_step", "max_new_tokens", "num_iterations"):
            if getattr(self, name) < 1:
                raise ValueError(f"grpo.{name}={getattr(self, name)} must be >= 1")
        if self.temperature <= 0:
            raise ValueError(f"grpo.temperature={self.temperature} must be > 0 (rollouts sample)")
        if not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError(f"grpo.top_p={self.top_p} must be in (0, 1], grpo.top_k >= 0")
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"grpo.loss_type={self.loss_type!r} is not one of {list(LOSS_TYPES)}")
        if self.scale_rewards not in SCALE_REWARDS:
            raise ValueError(
                f"grpo.scale_rewards={self.scale_rewards!r} is not one of {list(SCALE_REWARDS)}"
            )
        if (
            self.beta < 0
            or self.epsilon <= 0
            or (self.epsilon_high is not None and self.epsilon_high <= 0)
        ):
            raise ValueError("grpo.beta must be >= 0, grpo.epsilon and epsilon_high > 0")
        if self.overlong_penalty and not 0 < self.overlong_buffer <= self.max_new_tokens:
            raise ValueError(
                f"grpo.overlong_buffer={self.overlong_buffer} must be in [1, grpo.max_new_tokens="
                f"{self.max_new_tokens}] when grpo.overlong_penalty is set"
            )
        for key in ("speculative", "compile"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"grpo.{key} must be true or false, got {getattr(self, key)!r}")
        if self.max_failed_groups < 0:
            raise ValueError(f"grpo.max_failed_groups={self.max_failed_groups} must be >= 0")
        if self.beta == 0 and self.reference_from is not None:
            raise ValueError(
                f"grpo.reference_from={self.reference_from!r} but grpo.beta=0: without a KL term "
                "no reference is built; set grpo.beta > 0 or drop grpo.reference_from"
            )
        if self.reward_fn is not None:
            load_reward_fn(self.reward_fn)  # importable and callable, or a clear error now
        if self.corpus_config:
            known = {f.name for f in dataclasses.fields(synthetic.CorpusConfig)}
            unknown = sorted(set(self.corpus_config) - known)
            if unknown:
                raise ValueError(
                    f"grpo.corpus_config has unknown key(s) {unknown}; allowed: {sorted(known)}"
                )

    @property
    def rows_per_step(self) -> int:
        return self.prompts_per_step * self.num_generations


def prompt_pool(
    options: GRPOConfig, base: synthetic.CorpusConfig | None
) -> tuple[list[Item], list[tuple[str, ...]]]:
    """The training prompts: the (adjusted) corpus' train split, then the files' records; and each
    one's reference steps (a corpus problem's working; none for a file's record)."""
    items: list[Item] = []
    references: list[tuple[str, ...]] = []
    if base is not None:
        problems = synthetic.generate(dataclasses.replace(base, **options.corpus_config), "train")
        items += [problem_item(p) for p in problems]
        references += [tuple(p.steps) for p in problems]
    for path in options.files:
        records = file_items(path)
        items += records
        references += [()] * len(records)
    if not items:
        raise ValueError(
            "stage=grpo has no prompts: the corpus' train split and grpo.files are empty"
        )
    return items, references


class StepPrompts(IterableDataset):
    """Yields, for every step from the module's current one on, the pool indices [P] it trains on."""

    def __init__(
        self, pool_size: int, options: GRPOConfig, seed: int, start, rank: int = 0, world: int = 1
    ) -> None:
        self.pool_size, self.options, self.seed, self.start = pool_size, options, seed, start
        self.rank, self.world = rank, world  # each data-parallel rank takes its own prompts
        self._orders: dict[int, list[int]] = {}

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            order = list(range(self.pool_size))
            random.Random(f"{self.seed}:{epoch}").shuffle(order)
            self._orders = {epoch: order}  # passes are visited in order: keep one
        return self._orders[epoch]

    def indices(self, step: int) -> torch.Tensor:
        P = self.options.prompts_per_step
        first = ((step // self.options.num_iterations) * self.world + self.rank) * P
        positions = [divmod(p, self.pool_size) for p in range(first, first + P)]
        return torch.tensor([self._order(epoch)[offset] for epoch, offset in positions])

    def __iter__(self):
        step = self.start()  # read when iteration begins: after a resume has restored the step
        while True:
            yield self.indices(step)
            step += 1


class GRPODataModule(SFTDataModule):
    """`stage=grpo`: prompts for rollouts (train); the SFT conversations for val/bpb (validation)."""

    @staticmethod
    def corpus_of(run) -> Corpus:
        options: GRPOConfig = run.stage_options
        # Validation conversations: the corpus' (the files' records are prompts; only GSM8K-style
        # `#### N` answers render as conversations, so files validate only without the corpus)
        sft = SFTConfig(files=() if options.corpus else options.files, corpus=options.corpus)
        return ConversationsCorpus(sft, _stage_base(run, options))

    @classmethod
    def from_run(cls, run) -> GRPODataModule:
        datamodule = super().from_run(run)
        options: GRPOConfig = run.stage_options
        base = _stage_base(run, options)
        datamodule.options = options
        datamodule.pool, datamodule.references = prompt_pool(
            options, base.config if base is not None else None
        )
        tokenizer = datamodule.prepared.tokenizer
        datamodule.prompts = [
            prompt_ids(tokenizer, item.question, chat=True)[0].tolist() for item in datamodule.pool
        ]
        longest = max(len(p) for p in datamodule.prompts)
        room = run.data.seq_len + 1
        if longest + options.max_new_tokens > room:
            raise ValueError(
                f"the longest prompt ({longest} tokens) + grpo.max_new_tokens="
                f"{options.max_new_tokens} exceed the window data.seq_len + 1 = {room}; lower "
                "grpo.max_new_tokens or raise data.seq_len"
            )
        return datamodule

    def train_dataloader(self):
        trainer = self.trainer
        start = lambda: trainer.global_step  # noqa: E731
        dataset = StepPrompts(
            len(self.pool), self.options, self.seed, start, trainer.global_rank, trainer.world_size
        )
        return torch.utils.data.DataLoader(dataset, batch_size=None)
