"""The training optimizer: fused AdamW where torch has the kernel, weight decay on weights only."""

from __future__ import annotations

import torch

from cellclass.models import create_model
from cellclass.training.config import TrainConfig
from cellclass.training.optim import build_optimizer


def _model() -> torch.nn.Module:
    return create_model("lenet5", in_chans=1, heads={"t": 2}, image_size=32, task_types={"t": "single"})


def test_adamw_is_fused_on_cpu_and_cuda_only() -> None:
    model = _model()
    assert build_optimizer(model, TrainConfig(), "cpu").defaults["fused"] is True
    assert build_optimizer(model, TrainConfig(), "cuda").defaults["fused"] is True
    assert not build_optimizer(model, TrainConfig(), "mps").defaults["fused"]  # no fused kernel assumed there
    assert build_optimizer(model, TrainConfig()).defaults["fused"] is True  # parameters on the CPU
    assert isinstance(build_optimizer(model, TrainConfig(optimizer="sgd"), "cpu"), torch.optim.SGD)


def test_weight_decay_spares_biases_and_norms() -> None:
    model = _model()
    decay, no_decay = build_optimizer(model, TrainConfig(weight_decay=0.05), "cpu").param_groups
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim <= 1 for p in no_decay["params"])


def test_fused_step_matches_the_per_tensor_step() -> None:
    torch.manual_seed(0)
    a, b = _model(), _model()
    b.load_state_dict(a.state_dict())
    x, y = torch.rand(8, 1, 32, 32), torch.randint(0, 2, (8,))
    start = next(a.parameters()).detach().clone()
    fused = build_optimizer(a, TrainConfig(), "cpu")
    plain = build_optimizer(b, TrainConfig(), "mps")  # the same groups, torch's per-tensor update
    assert fused.defaults["fused"] and not plain.defaults["fused"]
    for model, opt in ((a, fused), (b, plain)):
        for _ in range(3):
            loss = torch.nn.functional.cross_entropy(model(x)["t"], y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert not torch.equal(next(a.parameters()), start)  # it trained
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, atol=1e-6, rtol=1e-5)
