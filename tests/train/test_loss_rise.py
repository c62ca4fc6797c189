"""The loop's free telemetry: SAM's loss rise L(w + ε) − L(w) per epoch, and the CPU seconds of the training steps."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.func import functional_call

from sharpness import SAM
from sharpness.data import load_dataset
from sharpness.models import build_model
from sharpness.optim import EveryK
from sharpness.train import Callback, Checkpointer, MetricsLogger, Trainer, load_checkpoint

RHO = 0.1


def _data():
    return load_dataset("synthetic", seed=0, n_train=96, n_test=48, dim=6)


def _trainer(optimizer: str = "sam", epochs: int = 2, callbacks=(), **kwargs) -> Trainer:
    data = _data()
    torch.manual_seed(0)
    model = build_model("mlp", input_shape=data.input_shape, num_classes=data.num_classes, hidden=(16,))
    if optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    else:
        policy = EveryK(1000) if optimizer == "sam-once" else None  # a SAM step at step 0, ERM steps after it
        opt = SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=0.1, momentum=0.9, model=model, policy=policy)
    return Trainer(model, opt, data, epochs=epochs, batch_size=16, callbacks=callbacks, **kwargs)


class _ByHand(Callback):
    """Recomputes each epoch's loss rise with plain autograd from the weights and inputs of the training forward
    passes: every closure SAM called twice is a pair of passes, at ``w`` (the first) and at ``w + ε``; here ``ε =
    ρ g/||g||`` is built from the gradient at ``w`` by hand and the loss at ``w + ε`` evaluated functionally."""

    def __init__(self, micro_batch: int | None = None) -> None:
        self.micro_batch = micro_batch
        self.passes: list[tuple[dict[str, torch.Tensor], torch.Tensor]] = []
        self.sums: list[list[float]] = [[0.0, 0]]  # per epoch: Σ n (L(w+ε) − L(w)), Σ n

    def on_train_start(self, trainer: Trainer) -> None:
        def record(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            if module.training and torch.is_grad_enabled():
                weights = {k: v.detach().clone() for k, v in module.named_parameters()}
                self.passes.append((weights, inputs[0].detach().clone()))

        trainer.model.register_forward_pre_hook(record)

    def on_step_end(self, trainer: Trainer, step) -> None:
        targets = step.y.split(self.micro_batch) if self.micro_batch else [step.y]
        if len(self.passes) == 2 * len(targets):  # a SAM step: two passes per closure
            for (weights, x), y in zip(self.passes[::2], targets, strict=True):
                self.sums[-1][0] += len(y) * self._rise(trainer.model, weights, x, y)
                self.sums[-1][1] += len(y)
        self.passes = []

    def on_epoch_end(self, trainer: Trainer, record) -> None:
        self.sums.append([0.0, 0])

    @staticmethod
    def _rise(model: nn.Module, weights: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> float:
        weights = {k: v.clone().requires_grad_(True) for k, v in weights.items()}
        loss = nn.functional.cross_entropy(functional_call(model, weights, (x,)), y)
        grads = torch.autograd.grad(loss, list(weights.values()))
        norm = torch.sqrt(sum((g**2).sum() for g in grads))
        perturbed = {k: (v + RHO * g / norm).detach() for (k, v), g in zip(weights.items(), grads, strict=True)}
        with torch.no_grad():
            return float(nn.functional.cross_entropy(functional_call(model, perturbed, (x,)), y) - loss)

    def epoch_means(self) -> list[float]:
        return [total / seen if seen else math.nan for total, seen in self.sums[:-1]]


@pytest.mark.parametrize("micro_batch", [None, 6])
def test_loss_rise_equals_a_by_hand_computation(micro_batch: int | None) -> None:
    """Plain SAM and m-SAM (6, 6, 4 per batch of 16): each epoch's sam_loss_rise is the example-weighted mean of
    L(w + ε) − L(w) over its SAM steps' closures, recomputed independently."""
    by_hand = _ByHand(micro_batch)
    trainer = _trainer(callbacks=[by_hand], micro_batch=micro_batch)
    trainer.fit()
    recorded = [record["sam_loss_rise"] for record in trainer.state.history]
    assert recorded == pytest.approx(by_hand.epoch_means(), rel=1e-4, abs=1e-7)
    assert all(rise > 0 for rise in recorded)  # a step along the gradient raises the loss (ρ small)
    assert trainer.final_metrics()["sam_loss_rise"] == recorded[-1]


def test_loss_rise_averages_sam_steps_only_and_is_null_without_them(tmp_path: Path) -> None:
    """SAM every 1000 steps: epoch 1 has one SAM step (its rise alone), epoch 2 none: NaN, written as null."""
    by_hand = _ByHand()
    trainer = _trainer("sam-once", callbacks=[by_hand, MetricsLogger(tmp_path, tensorboard=False)])
    state = trainer.fit()
    first, second = (record["sam_loss_rise"] for record in state.history)
    assert state.multi_pass_steps == 1 and first == pytest.approx(by_hand.epoch_means()[0], rel=1e-4)
    assert math.isnan(second)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[1]["sam_loss_rise"] is None and rows[0]["sam_loss_rise"] == pytest.approx(first)
    assert "sam_loss_rise" in (tmp_path / "metrics.csv").read_text().splitlines()[0]


def test_sgd_has_no_loss_rise_and_cpu_seconds_are_measured() -> None:
    trainer = _trainer("sgd", epochs=3)
    state = trainer.fit()
    final = trainer.final_metrics()
    assert all("sam_loss_rise" not in record for record in state.history) and "sam_loss_rise" not in final
    cpu = [record["train_cpu_seconds"] for record in state.history]
    assert 0 < cpu[0] <= cpu[1] <= cpu[2] == final["train_cpu_seconds"] == state.train_cpu_seconds
    # CPU time of all the process's threads: at most wall-clock × cores (plus the clocks' granularity)
    assert state.train_cpu_seconds <= state.train_seconds * (os.cpu_count() or 1) + 0.05


def test_resume_keeps_the_records_and_an_old_checkpoint_without_cpu_seconds_resumes(tmp_path: Path) -> None:
    whole = _trainer(epochs=3)
    whole.fit()
    first = _trainer(epochs=2, callbacks=[Checkpointer(tmp_path)])
    first.fit()
    checkpoint = load_checkpoint(tmp_path)
    assert checkpoint["train_state"]["train_cpu_seconds"] == first.state.train_cpu_seconds > 0
    del checkpoint["train_state"]["train_cpu_seconds"]  # as written before the field existed
    resumed = _trainer(epochs=3)
    resumed.load_state_dict(checkpoint)
    assert resumed.state.train_cpu_seconds == 0.0
    resumed.fit()
    rises = [record["sam_loss_rise"] for record in resumed.state.history]
    assert rises == [record["sam_loss_rise"] for record in whole.state.history]  # bit-identical continuation
    assert 0 < resumed.state.train_cpu_seconds  # the resumed epoch's alone
