"""Overhead of ``sharpness.train.Trainer`` against a minimal hand-written PyTorch loop (SGD, one epoch).

Both train the CLI's default setting (MNIST-1D 4000 examples, the ``cnn1d`` model, SGD momentum 0.9, weight decay
5e-4, cosine schedule stepped per batch, batch 64) from the same initial weights with the same batch order.
The hand-written loop is what a user would write: ``randperm``, index, ``zero_grad``, forward, backward, ``step``,
``scheduler.step``, ``loss.item()``. Two figures per epoch:

* training pass: the steps only (the Trainer's ``state.train_seconds``; the hand loop timed the same way);
* full epoch: the training pass plus the test-set evaluation that both do after each epoch.

Contenders alternate within each repeat (which goes first rotates) and the statistic is the median over repeats
of the per-epoch time; the target is ours / hand-written <= 1.05 on the training pass. Single-threaded torch by
default, as in ``bench_sam_step.py`` (see its notes on this 2-vCPU VM).

    python benchmarks/bench_train_loop.py [--repeats 15] [--epochs 3] [--threads 1] [--json PATH]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from sharpness.data import load_dataset
from sharpness.experiments.config import RunConfig
from sharpness.experiments.runner import build_trainer

RESULTS = Path(__file__).resolve().parent / "results" / "train_loop.json"
TARGET = 1.05


def time_ours(config: RunConfig, data) -> tuple[float, float]:
    """(training-pass seconds per epoch, full-epoch seconds per epoch) of the Trainer."""
    trainer = build_trainer(config, data)
    start = time.perf_counter()
    trainer.fit()
    total = time.perf_counter() - start
    return trainer.state.train_seconds / config.epochs, total / config.epochs


def time_hand_written(config: RunConfig, data) -> tuple[float, float]:
    """The same training written by hand; the model and optimizer come from the same builder (same weights)."""
    trainer = build_trainer(config, data)  # only to get the identically initialised model/optimizer/schedule
    model, opt, sched = trainer.model, trainer.optimizer, trainer.scheduler
    x_all, y_all, n, batch = data.x_train, data.y_train, len(data.y_train), config.batch_size
    generator = torch.Generator().manual_seed(config.seed)
    train_seconds, start = 0.0, time.perf_counter()
    for _ in range(config.epochs):
        epoch_start = time.perf_counter()
        model.train()
        order = torch.randperm(n, generator=generator)
        for i in range(0, n, batch):
            index = order[i : i + batch]
            x, y = x_all[index], y_all[index]
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            sched.step()
            loss.item()
        train_seconds += time.perf_counter() - epoch_start
        model.eval()
        with torch.no_grad():
            correct, loss_sum = 0, 0.0
            for i in range(0, len(data.y_test), 1024):
                out = model(data.x_test[i : i + 1024])
                loss_sum += float(F.cross_entropy(out, data.y_test[i : i + 1024], reduction="sum"))
                correct += int((out.argmax(1) == data.y_test[i : i + 1024]).sum())
    total = time.perf_counter() - start
    return train_seconds / config.epochs, total / config.epochs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--epochs", type=int, default=3, help="epochs per timed run (default 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1; 0 = torch default)")
    parser.add_argument("--json", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = RunConfig(epochs=args.epochs, optimizer="sgd")
    data = load_dataset("mnist1d")
    contenders = {"ours": time_ours, "hand": time_hand_written}
    for timer in contenders.values():  # warm-up
        timer(RunConfig(epochs=1, optimizer="sgd"), data)
    raw: dict[str, list[tuple[float, float]]] = {name: [] for name in contenders}
    for repeat in range(args.repeats):
        order = list(contenders) if repeat % 2 == 0 else list(reversed(contenders))
        for name in order:
            raw[name].append(contenders[name](config, data))
    result = {}
    for index, part in enumerate(("train_pass", "full_epoch")):
        ours = statistics.median(t[index] for t in raw["ours"])
        hand = statistics.median(t[index] for t in raw["hand"])
        paired = statistics.median(o[index] / h[index] for o, h in zip(raw["ours"], raw["hand"], strict=True))
        result[part] = {"ours_ms": 1e3 * ours, "hand_ms": 1e3 * hand, "ratio": ours / hand, "paired_ratio": paired}
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, threads {threads}, {args.repeats} repeats x {args.epochs} epochs")
    print(f"{'per epoch':<12}{'ours ms':>10}{'hand ms':>10}{'ours/hand':>11}{'paired':>9}")
    for part, row in result.items():
        print(
            f"{part:<12}{row['ours_ms']:>10.1f}{row['hand_ms']:>10.1f}{row['ratio']:>11.3f}{row['paired_ratio']:>9.3f}"
        )
    verdict = "PASS" if result["train_pass"]["ratio"] <= TARGET else "FAIL"
    print(f"target: training pass ours/hand <= {TARGET}: {verdict}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": "train_loop",
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "config": {"repeats": args.repeats, "epochs": args.epochs, "threads": torch.get_num_threads()},
        "machine": {"torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform()},
        "raw_seconds_per_epoch": raw,
        "result": result,
        "target": TARGET,
        "pass": verdict == "PASS",
    }
    args.json.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    raise SystemExit(main())
