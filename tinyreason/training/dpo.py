"""`stage=dpo`: Direct Preference Optimization (Rafailov et al. 2023, arXiv 2305.18290) against a
frozen reference, the starting weights.

Per pair, log-probabilities are summed over the response tokens (the assistant turn and its eos)
of the chosen and the rejected conversation, for the policy and the reference:
    sigmoid  -log σ(β ((π_c − ref_c) − (π_r − ref_r)))
    ipo      ((π_c − ref_c) / n_c − (π_r − ref_r) / n_r − 1 / (2β))²   (IPO, per-token averaged as
             TRL does, arXiv 2310.12036)
Logged: dpo/rewards_chosen = β (π_c − ref_c), dpo/rewards_rejected, dpo/accuracy (chosen reward
above rejected), dpo/margin; val/dpo_loss and val/dpo_accuracy, and val/bpb of the chosen
responses (what the checkpoint monitor reads). The reference lives in the module (its weights
are in every checkpoint, so a resumed run keeps the same reference); it runs in eval mode, so
MoE layers count only the policy's tokens for the bias update (chosen and rejected alike).
"""

from __future__ import annotations

import copy
import hashlib

import torch
import torch.nn.functional as F

from tinyreason.data.packing import split_flags
from tinyreason.model.transformer import IGNORE_INDEX
from tinyreason.training.module import LitCausalLM


def response_logps(
    logits: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of log p(target) over the supervised targets [B], their count [B])."""
    logp = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    mask = targets != IGNORE_INDEX
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(-1), mask.sum(-1)


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    n_chosen: torch.Tensor | None = None,
    n_rejected: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-pair losses, chosen rewards, rejected rewards) from summed response log-probs."""
    chosen, rejected = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * (chosen - rejected))
    elif loss_type == "ipo":
        delta = chosen / n_chosen.clamp(min=1) - rejected / n_rejected.clamp(min=1)
        losses = (delta - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"dpo.loss_type={loss_type!r} is not one of ['sigmoid', 'ipo']")
    return losses, beta * chosen.detach(), beta * rejected.detach()


class DPOModule(LitCausalLM):
    masks_documents = False  # a window holds one conversation: the chosen or the rejected one

    def __init__(
        self,
        model: dict,
        optim: dict,
        precision: dict | None = None,
        loss_flag: int | None = None,
        beta: float = 0.1,
        loss_type: str = "sigmoid",
        precompute_ref: bool = False,
    ) -> None:
        if loss_flag is None:
            raise ValueError("stage=dpo needs response-flagged pairs (a loss flag)")
        super().__init__(model, optim, precision, loss_flag)
        self.beta, self.loss_type, self.precompute_ref = beta, loss_type, precompute_ref
        self.reference = None
        self.ref_table: dict[bytes, float] | None = None  # precompute_ref: item digest -> logps

    @classmethod
    def from_run(cls, run, datamodule) -> DPOModule:
        if run.init_from is None and run.resume is None:
            raise ValueError(
                "stage=dpo starts from a trained model, its reference: "
                "model.init_from=<run dir | .ckpt | HF folder>"
            )
        o = run.stage_options
        module = super().from_run(
            run, datamodule, beta=o.beta, loss_type=o.loss_type, precompute_ref=o.precompute_ref
        )
        module.configure_model()
        module.reference.load_state_dict(module.model.state_dict())  # the starting weights
        if o.precompute_ref:
            module.ref_table = reference_table(module, datamodule, run.run_dir / REF_FILE)
        return module

    def configure_model(self) -> None:
        if self.model is not None:
            return
        super().configure_model()
        self.reference = copy.deepcopy(self.model).requires_grad_(False)

    @property
    def _tokens_per_step(self) -> int:
        return 2 * super()._tokens_per_step  # a chosen and a rejected window per pair

    def _pairs(self, batch: torch.Tensor):
        """(policy logps [2B], reference logps [2B], response tokens [2B], policy output,
        targets [2B, W-1]) of a batch of [chosen | rejected] items: chosen rows first."""
        half = batch.shape[1] // 2
        windows = torch.cat([batch[:, :half], batch[:, half:]])
        ids, supervised = split_flags(windows, self.loss_flag)
        inputs = ids[:, :-1]
        targets = ids[:, 1:].masked_fill(~supervised[:, 1:], IGNORE_INDEX)
        out = self.model(inputs)
        logps, counts = response_logps(out.logits, targets)
        if self.ref_table is not None:
            ref = torch.tensor([self.ref_table[_digest(w)] for w in windows], device=logps.device)
        else:
            with torch.no_grad():
                self.reference.eval()
                ref, _ = response_logps(self.reference(inputs).logits, targets)
        return logps, ref, counts, out, targets

    def _loss(self, batch: torch.Tensor, prefix: str):
        logps, ref, counts, out, targets = self._pairs(batch)
        (pc, pr), (rc, rr), (nc, nr) = logps.chunk(2), ref.chunk(2), counts.chunk(2)
        losses, chosen, rejected = dpo_loss(pc, pr, rc, rr, self.beta, self.loss_type, nc, nr)
        stats = {
            f"{prefix}/rewards_chosen": chosen.mean(),
            f"{prefix}/rewards_rejected": rejected.mean(),
            f"{prefix}/accuracy": (chosen > rejected).float().mean(),
            f"{prefix}/margin": (chosen - rejected).mean(),
        }
        return losses.mean(), stats, out, targets

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss, stats, out, _ = self._loss(batch, "dpo")
        total = loss + out.balance  # the MoE sequence-wise balance loss, as in pretraining
        self.log("train/loss", total, prog_bar=True)
        self.log_dict({"train/dpo_loss": loss, "train/balance": out.balance, **stats})
        self.log("lr", self.lr_schedulers().get_last_lr()[0])
        self.log("tokens", float(self.tokens_seen + self._tokens_per_step))
        return total

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        loss, stats, out, targets = self._loss(batch, "val_dpo")
        self.log("val/dpo_loss", loss, sync_dist=True)
        self.log("val/dpo_accuracy", stats["val_dpo/accuracy"], sync_dist=True)
        n = batch.shape[0]  # the chosen responses: their BPB is what checkpoints compare
        chosen_logits, chosen_targets = out.logits[:n], targets[:n]
        ce = F.cross_entropy(
            chosen_logits.flatten(0, 1).float(), chosen_targets.flatten(), ignore_index=IGNORE_INDEX
        )
        self._update_val(chosen_logits, chosen_targets, ce)


REF_FILE = "ref_logps.pt"


def _digest(window: torch.Tensor) -> bytes:
    return hashlib.sha256(window.to(torch.int64).cpu().numpy().tobytes()).digest()


@torch.no_grad()
def reference_table(module: DPOModule, datamodule, path) -> dict[bytes, float]:
    """`dpo.precompute_ref`: the reference's response log-prob of every window of both splits,
    computed once and saved to the run dir (a resumed run reads it back), keyed by the window's
    tokens; training then runs no reference forward."""
    if path.is_file():
        return torch.load(path, weights_only=True)
    table: dict[bytes, float] = {}
    reference = module.reference.eval()
    for split in ("train", "validation"):
        items = list(datamodule._dataset(split, shuffle=False))
        for start in range(0, len(items), 16):
            batch = torch.stack(items[start : start + 16])
            half = batch.shape[1] // 2
            windows = torch.cat([batch[:, :half], batch[:, half:]])
            ids, supervised = split_flags(windows, module.loss_flag)
            targets = ids[:, 1:].masked_fill(~supervised[:, 1:], IGNORE_INDEX)
            logps, _ = response_logps(reference(ids[:, :-1]).logits, targets)
            table |= {_digest(w): float(v) for w, v in zip(windows, logps, strict=True)}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(table, path)
    return table
