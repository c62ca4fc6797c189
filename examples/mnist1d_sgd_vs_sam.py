"""SAM in your own PyTorch loop: SGD vs SAM on MNIST-1D, written out by hand.

``sharpness compare`` does this (with seeds, confidence intervals and a report); this script shows the few lines
SAM needs in a plain training loop. Same initial weights and data order for both optimizers; SGD with momentum
0.9, weight decay 5e-4, batch 64, cosine schedule; SAM wraps that same SGD::

    python examples/mnist1d_sgd_vs_sam.py [--epochs 60] [--rho 0.05] [--lr 0.05] [--seed 0]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from sharpness import SAM
from sharpness.data import iterate_batches, load_dataset, num_batches
from sharpness.models import build_model


def train(use_sam: bool, args: argparse.Namespace) -> tuple[float, float]:
    """Train one model; returns (test accuracy, seconds)."""
    data = load_dataset("mnist1d")
    torch.manual_seed(args.seed)
    model = build_model("cnn1d", input_shape=data.input_shape, num_classes=data.num_classes)
    sgd = dict(lr=args.lr, momentum=0.9, weight_decay=5e-4)
    if use_sam:
        opt = SAM(model.parameters(), torch.optim.SGD, rho=args.rho, model=model, **sgd)
    else:
        opt = torch.optim.SGD(model.parameters(), **sgd)
    steps = args.epochs * num_batches(len(data.y_train), 64)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    order = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    for _ in range(args.epochs):
        for x, y in iterate_batches(data.x_train, data.y_train, 64, shuffle=True, generator=order):

            def closure() -> torch.Tensor:
                opt.zero_grad()
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                return loss

            opt.step(closure)  # SGD calls the closure once; SAM twice: at w and at w + ε
            scheduler.step()
    seconds = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        accuracy = (model(data.x_test).argmax(1) == data.y_test).float().mean().item()
    return accuracy, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--rho", type=float, default=0.05)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for name, use_sam in (("SGD", False), ("SAM", True)):
        accuracy, seconds = train(use_sam, args)
        print(f"{name}: test accuracy {100 * accuracy:.1f}%  ({seconds:.1f} s)")


if __name__ == "__main__":
    main()
