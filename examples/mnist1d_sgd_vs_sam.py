"""SGD vs SAM on MNIST-1D: the same model, initialisation and data order, trained with each optimizer.

MNIST-1D (Greydanus 2020) is generated locally (4000 train / 1000 test signals of length 40, 10 classes;
nothing is downloaded), and the default model is a small 1-D CNN (8k parameters), so the whole comparison
runs on one CPU core in about a minute:

    python examples/mnist1d_sgd_vs_sam.py
    python examples/mnist1d_sgd_vs_sam.py --epochs 60 --rho 0.1 --seed 1
    python examples/mnist1d_sgd_vs_sam.py --model mlp     # 40-256-256-10 MLP: ~70 % instead of ~95 %

Both runs use SGD with momentum 0.9, weight decay 5e-4, batch size 64 and a cosine learning-rate schedule
(stepped every batch); the SAM run wraps that same SGD in :class:`sharpness.SAM` (rho = 0.05 by default),
which costs two forward and backward passes per step instead of one, so it takes about twice as long.
Both reach 100 % training accuracy; the comparison to look at is the test accuracy and test loss.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from sharpness import SAM
from sharpness.data import Mnist1D, load_mnist1d

BATCH_SIZE = 64
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4


class ConvNet(nn.Module):
    """A small 1-D CNN (8k parameters with 32 channels), close to the one in the MNIST-1D paper."""

    def __init__(self, channels: int = 32, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(1, channels, kernel_size=5, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv1d(channels, channels, kernel_size=3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv1d(channels, channels, kernel_size=3, stride=2, padding=1),
            nn.ReLU(),
        )
        self.head = nn.Linear(channels * 5, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x.unsqueeze(1)).flatten(1))


class MLP(nn.Module):
    """40 -> 256 -> 256 -> 10 with ReLU (79k parameters)."""

    def __init__(self, hidden: int = 256, num_classes: int = 10) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(40, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


MODELS: dict[str, Callable[[], nn.Module]] = {"cnn": ConvNet, "mlp": MLP}


@dataclass
class Result:
    name: str
    test_acc: float
    test_loss: float
    train_loss: float
    train_acc: float
    seconds: float


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor) -> tuple[float, float]:
    """Mean cross-entropy and accuracy over the whole split."""
    model.eval()
    logits = model(x)
    model.train()
    return F.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item()


def train(name: str, args: argparse.Namespace, data: Mnist1D) -> Result:
    torch.manual_seed(args.seed)  # identical initialisation for both optimizers
    model = MODELS[args.model]()
    sgd_kwargs = dict(lr=args.lr, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    if name == "SAM":
        opt: torch.optim.Optimizer = SAM(model.parameters(), torch.optim.SGD, rho=args.rho, **sgd_kwargs)
    else:
        opt = torch.optim.SGD(model.parameters(), **sgd_kwargs)
    n = len(data.x_train)
    steps_per_epoch = math.ceil(n / BATCH_SIZE)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.epochs * steps_per_epoch)
    order = torch.Generator().manual_seed(args.seed)  # identical data order for both optimizers

    start = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        perm = torch.randperm(n, generator=order)
        total, seen = 0.0, 0
        for i in range(0, n, BATCH_SIZE):
            idx = perm[i : i + BATCH_SIZE]
            xb, yb = data.x_train[idx], data.y_train[idx]

            def closure() -> Tensor:
                loss = F.cross_entropy(model(xb), yb)
                loss.backward()
                return loss

            if isinstance(opt, SAM):
                loss = opt.step(closure)  # gradient at w, ascent to w + eps, gradient there, base step at w
            else:
                opt.zero_grad(set_to_none=True)
                loss = closure()
                opt.step()
            scheduler.step()
            total += loss.item() * len(idx)
            seen += len(idx)
        if epoch == 1 or epoch % max(1, args.epochs // 5) == 0 or epoch == args.epochs:
            test_loss, test_acc = evaluate(model, data.x_test, data.y_test)
            print(
                f"  [{name}] epoch {epoch:3d}/{args.epochs}  train loss {total / seen:.4f}  "
                f"test loss {test_loss:.4f}  test acc {100 * test_acc:5.1f}%  "
                f"({time.perf_counter() - start:.1f}s)",
                flush=True,
            )
    seconds = time.perf_counter() - start
    train_loss, train_acc = evaluate(model, data.x_train, data.y_train)
    test_loss, test_acc = evaluate(model, data.x_test, data.y_test)
    return Result(name, test_acc, test_loss, train_loss, train_acc, seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=150, help="training epochs for each optimizer")
    parser.add_argument("--seed", type=int, default=0, help="seed for the initialisation and the data order")
    parser.add_argument("--rho", type=float, default=0.05, help="SAM's perturbation radius")
    parser.add_argument("--lr", type=float, default=0.05, help="peak learning rate of the cosine schedule")
    parser.add_argument("--model", choices=sorted(MODELS), default="cnn", help="network to train")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (one is fastest for a model this small)"
    )
    args = parser.parse_args()
    if args.epochs < 1 or args.threads < 1:
        parser.error("--epochs and --threads must be at least 1")
    torch.set_num_threads(args.threads)

    data = load_mnist1d()  # the standard split: 4000 train / 1000 test, generator seed 42
    print(
        f"MNIST-1D: {len(data.x_train)} train / {len(data.x_test)} test signals of length "
        f"{data.x_train.shape[1]}; model {args.model}, {args.epochs} epochs, batch {BATCH_SIZE}, "
        f"lr {args.lr} (cosine), momentum {MOMENTUM}, weight decay {WEIGHT_DECAY}, SAM rho {args.rho}, "
        f"torch threads {torch.get_num_threads()}"
    )
    results = []
    for name in ("SGD", "SAM"):
        print(f"{name}:", flush=True)
        result = train(name, args, data)
        print(
            f"{name}: test accuracy {100 * result.test_acc:.1f}%, final train loss {result.train_loss:.4f}, "
            f"wall-clock {result.seconds:.1f}s\n"
        )
        results.append(result)

    header = f"{'optimizer':<10}{'test acc':>10}{'test loss':>11}{'train acc':>11}{'train loss':>12}{'time':>9}"
    print(header)
    print("-" * len(header))
    for r in results:
        print(
            f"{r.name:<10}{100 * r.test_acc:>9.1f}%{r.test_loss:>11.4f}{100 * r.train_acc:>10.1f}%"
            f"{r.train_loss:>12.4f}{r.seconds:>8.1f}s"
        )


if __name__ == "__main__":
    main()
