import math

import pytest
import torch

from tinyreason.training.metrics import BitsPerByte
from tinyreason.training.optim import OptimConfig, lr_factor


def test_bits_per_byte_hand_computed():
    # token 1: 3 bytes at ln2*3 nats (1 bit/byte); token 2: 1 byte at ln2*1 nats; token 3: a special
    # token (0 bytes) whose loss must not count. Total: 4 bits over 4 bytes = 1.0 bit/byte.
    metric = BitsPerByte()
    metric.update(torch.tensor([3 * math.log(2), math.log(2), 5.0]), torch.tensor([3, 1, 0]))
    assert metric.compute().item() == pytest.approx(1.0)
    # a second batch: 2 bytes at 6 bits -> (4 + 6) bits / 6 bytes
    metric.update(torch.tensor([[6 * math.log(2)]]), torch.tensor([[2]]))
    assert metric.compute().item() == pytest.approx(10 / 6)


def test_uniform_prediction_bpb():
    # uniform over V=256 with one byte per token is exactly 8 bits per byte
    v = 256
    logits = torch.zeros(10, v)
    targets = torch.randint(0, v, (10,))
    nats = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    metric = BitsPerByte()
    metric.update(nats, torch.ones(10, dtype=torch.int32))
    assert metric.compute().item() == pytest.approx(8.0)


@pytest.mark.parametrize("schedule", ["cosine", "wsd", "constant"])
def test_schedules_warm_up_then_end_at_min(schedule):
    cfg = OptimConfig(schedule=schedule, warmup_steps=10, total_steps=100, min_lr_ratio=0.1)
    assert lr_factor(0, cfg) == pytest.approx(0.1)
    assert lr_factor(9, cfg) == pytest.approx(1.0)
    end = lr_factor(100, cfg)
    assert end == pytest.approx(1.0 if schedule == "constant" else 0.1)
    values = [lr_factor(s, cfg) for s in range(10, 101)]
    assert all(a >= b - 1e-12 for a, b in zip(values, values[1:], strict=False)), (
        "lr must not rise after warmup"
    )
