"""What the Lightning tests share: the guide's example (executed from the docs), presets, data, hand-written loops,
and the scenarios that run under Lightning's DDP strategy in spawned processes (see ``spawned.py``)."""

from __future__ import annotations

import datetime
import math
import os
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.strategies import DDPStrategy
from spawned import run_spawned
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.utils.data import DataLoader, TensorDataset

import sharpness
from sharpness.integrations.lightning import SAMCallback

DOC = Path(__file__).resolve().parents[2] / "docs" / "integrations.md"
MARKER = "<!-- the block below is executed by tests/integrations/test_lightning.py -->"


def load_example() -> types.ModuleType:
    """The guide's example: the first ``python`` block after the marker in the docs, executed as a module."""
    after = DOC.read_text(encoding="utf-8").split(MARKER, 1)[1]
    source = after.split("```python\n", 1)[1].split("\n```", 1)[0]
    module = types.ModuleType("lightning_guide_example")
    exec(compile(source, str(DOC), "exec"), module.__dict__)
    return module


example = load_example()

STEPS = 6
ACCUMULATE = 2  # accumulate_grad_batches of the DDP runs with accumulation (STEPS // 2 optimizer steps)
BASE = dict(lr=0.1, momentum=0.9)
PRESETS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "sam": lambda ps, **kw: sharpness.SAM(ps, torch.optim.SGD, rho=0.05, **BASE, **kw),
    "aesam": lambda ps, **kw: sharpness.AESAM(ps, torch.optim.SGD, total_steps=STEPS, delta=0.5, **BASE, **kw),
    "looksam": lambda ps, **kw: sharpness.LookSAM(ps, torch.optim.SGD, k=2, alpha=0.5, **BASE, **kw),
    "sgd": lambda ps, **kw: torch.optim.SGD(ps, **BASE),
}
QUIET = dict(logger=False, enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False)


class PresetClassifier(example.Classifier):
    """The guide's module with one of :data:`PRESETS` as its optimizer."""

    def __init__(self, preset: str) -> None:
        super().__init__()
        self.preset = preset
        self.training_steps = 0  # calls of training_step

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return PRESETS[self.preset](self.parameters())

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.training_steps += 1
        if self.preset == "sgd":  # the guide's training_step asks SAM whether it is perturbed
            return nn.functional.cross_entropy(self.net(batch[0]), batch[1])
        return super().training_step(batch, batch_idx)


def seeded_module(preset: str = "sam") -> PresetClassifier:
    torch.manual_seed(0)
    return PresetClassifier(preset)


def data(world_size: int = 1, dtype: torch.dtype = torch.float32, batches: int = STEPS) -> TensorDataset:
    """``batches`` global batches of ``8 * world_size`` rows; odd rows' inputs are 10x larger, so that under DDP
    (rank r's shard is rows r::2) the replicas' gradients differ."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(8 * world_size * batches, 10, generator=gen, dtype=dtype)
    x[1::2] *= 10.0
    return TensorDataset(x, torch.randint(0, 3, (len(x),), generator=gen))


def loader(dataset: TensorDataset, batch_size: int = 8) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=False)


def flat_state(net: nn.Module, buffers: bool = True) -> torch.Tensor:
    """Parameters (and buffers: BatchNorm's running statistics), flat."""
    tensors = [*net.parameters(), *(net.buffers() if buffers else ())]
    return torch.cat([t.detach().reshape(-1).double() for t in tensors])


def closure_of(net: nn.Module, x: torch.Tensor, y: torch.Tensor, divisor: float = 1.0) -> Callable[[], torch.Tensor]:
    """A SAM closure: the cross-entropy of ``net`` on ``(x, y)`` divided by ``divisor``, back-propagated."""

    def closure() -> torch.Tensor:
        loss = nn.functional.cross_entropy(net(x), y) / divisor
        loss.backward()
        return loss

    return closure


def precision_options(name: str) -> dict[str, Any]:
    """Trainer options for a precision. On CPU Lightning turns precision="16-mixed" into bf16-mixed; its fp16 AMP
    plugin (with a GradScaler), which a CUDA run gets, is passed explicitly."""
    return {"plugins": [MixedPrecision("16-mixed", "cpu")]} if name == "16-mixed" else {"precision": name}


class Recorder(Callback):
    """Counts the gradient all-reduces of the strategy's DDP module (a comm hook; Lightning's ``ddp_comm_hook`` is
    for CUDA only) and records after each batch (SAM steps so far, the policy's last ``s``)."""

    def __init__(self) -> None:
        self.allreduces = 0
        self.decisions: list[tuple[int, float]] = []

    def _hook(self, state, bucket):  # unannotated: DDP checks the annotations of a comm hook
        self.allreduces += 1
        return default_hooks.allreduce_hook(state, bucket)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trainer.strategy.model.register_comm_hook(None, self._hook)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        opt = trainer.optimizers[0]
        stats = opt.statistics() if isinstance(opt, sharpness.SAM) else {"sam_steps": 0}
        self.decisions.append((stats["sam_steps"], stats.get("s", math.nan)))


# ----------------------------------------------------------------------------- DDP (run on every rank)

DDP_RUNS = {  # name: (preset, SAMCallback's epsilon_from or None for no callback, precision, accumulate_grad_batches)
    "sam": ("sam", "replica", "64-true", 1),
    "sam_global": ("sam", "global", "64-true", 1),
    "sam_fp16": ("sam", "replica", "16-mixed", 1),
    "aesam": ("aesam", "replica", "64-true", 1),
    "sgd": ("sgd", None, "64-true", 1),
    "sam_accumulate": ("sam", "replica", "64-true", ACCUMULATE),
    "sam_global_accumulate": ("sam", "global", "64-true", ACCUMULATE),
    "sam_fp16_accumulate": ("sam", "replica", "16-mixed", ACCUMULATE),
}


def scenario_ddp(rank: int, world_size: int) -> dict[str, Any]:
    """Lightning's DDP strategy inside the process group ``spawned.py`` made (LOCAL_RANK set: Lightning launches
    nothing), for each of :data:`DDP_RUNS`: final weights, gradient all-reduces and policy decisions."""
    os.environ.update(LOCAL_RANK=str(rank), NODE_RANK="0", WORLD_SIZE=str(world_size))
    out = {}
    for name, (preset, epsilon_from, precision, accumulate) in DDP_RUNS.items():
        recorder = Recorder()
        sam = [SAMCallback(epsilon_from)] if epsilon_from is not None else []
        trainer = L.Trainer(
            accelerator="cpu", devices=world_size, max_epochs=1, callbacks=[recorder, *sam],
            strategy=DDPStrategy(process_group_backend="gloo", timeout=datetime.timedelta(seconds=60)),
            default_root_dir=os.environ.get("TMPDIR", "/tmp"), use_distributed_sampler=False,
            accumulate_grad_batches=accumulate, **precision_options(precision), **QUIET,
        )  # fmt: skip
        module = seeded_module(preset)
        x, y = data(world_size, torch.float64 if precision == "64-true" else torch.float32).tensors
        # this rank's shard, rows rank::world_size of each global batch (Lightning's sampler would shuffle)
        trainer.fit(module, loader(TensorDataset(x[rank::world_size], y[rank::world_size])))
        state = flat_state(module.net, buffers=False)
        out[name] = {"state": state, "allreduces": recorder.allreduces, "decisions": recorder.decisions}
    return out


def spawn_ddp(world_size: int = 2) -> list[dict[str, Any]]:
    return run_spawned({"ddp": scenario_ddp}, world_size, timeout=150.0)
