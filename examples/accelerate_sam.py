"""SAM in a Hugging Face accelerate loop: one process, or several (DDP) with ``accelerate launch``.

The loop is :func:`train`; :func:`prepare` builds SAM on the prepared model. The test suite runs these two
functions (tests/integrations/test_accelerate.py) and docs/integrations.md shows them::

    python examples/accelerate_sam.py [--epochs 5] [--mixed-precision bf16]
    ACCELERATE_USE_CPU=true torchrun --nproc_per_node 2 examples/accelerate_sam.py  # 2 processes on CPU (gloo)
    accelerate launch --multi_gpu --num_processes 2 examples/accelerate_sam.py --mixed-precision fp16  # 2 GPUs
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from sharpness import SAM
from sharpness.integrations.accelerate import sam_step


def prepare(
    accelerator: Accelerator,
    model: nn.Module,
    build_optimizer: Callable[[nn.Module], SAM],
    loader: DataLoader,
) -> tuple[nn.Module, torch.optim.Optimizer, DataLoader]:
    """The model first (DDP with several processes), then SAM built on it (it must know the DDP module), the rest."""
    model = accelerator.prepare(model)
    optimizer, loader = accelerator.prepare(build_optimizer(model), loader)
    return model, optimizer, loader


def train(
    accelerator: Accelerator, model: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader, epochs: int
) -> list[float]:
    """``epochs`` epochs of SAM steps; the mean training loss of each epoch (at w, over all processes)."""
    model.train()
    losses = []
    for _ in range(epochs):
        total = torch.zeros((), device=accelerator.device)
        for x, y in loader:
            total += sam_step(accelerator, model, optimizer, lambda: nn.functional.cross_entropy(model(x), y))
        losses.append(accelerator.reduce(total, "mean").item() / len(loader))
    return losses


def main(argv: list[str] | None = None) -> list[float]:
    """Train a small classifier on synthetic data with SAM; prints and returns the epochs' mean training losses."""
    parser = argparse.ArgumentParser(description="SAM in a Hugging Face accelerate loop")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], default="no")
    parser.add_argument("--rho", type=float, default=0.05)
    parser.add_argument("--lr", type=float, default=0.1)
    args = parser.parse_args(argv)

    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    torch.manual_seed(0)  # the same data and initial weights in every process
    x = torch.randn(2048, 20)
    y = (x @ torch.randn(20, 5)).argmax(1)
    loader = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True)
    model = nn.Sequential(nn.Linear(20, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 5))

    def build_optimizer(prepared: nn.Module) -> SAM:
        return SAM(prepared.parameters(), torch.optim.SGD, rho=args.rho, model=prepared, lr=args.lr, momentum=0.9)

    model, optimizer, loader = prepare(accelerator, model, build_optimizer, loader)
    losses = train(accelerator, model, optimizer, loader, args.epochs)
    for epoch, loss in enumerate(losses, start=1):
        accelerator.print(f"epoch {epoch}: train loss {loss:.4f}")
    return losses


if __name__ == "__main__":
    main()
