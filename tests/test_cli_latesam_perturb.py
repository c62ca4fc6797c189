"""`sharpness train --optimizer latesam --sam-start F` and `--perturb all|norm|prefixes`: end to end, checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sharpness.cli import main
from sharpness.experiments.config import RunConfig
from sharpness.experiments.runner import build_trainer, load_data

TINY = ["--dataset", "synthetic", "--epochs", "2", "--batch-size", "32", "--threads", "1", "--quiet"]


@pytest.mark.parametrize("optimizer", ["latesam", "lateaesam"])
def test_latesam_from_the_cli(optimizer: str, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(["train", *TINY, "--optimizer", optimizer, "--sam-start", "0.5", "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["sam_start"] == 0.5
    final = json.loads((out / "final.json").read_text())
    if optimizer == "latesam":  # 2 epochs of 16 steps: epoch 1 SGD, epoch 2 SAM
        assert (final["steps"], final["passes"], final["sam_fraction"]) == (32, 48, 0.5)
    else:  # AE-SAM decides on the late half only
        assert 0 < final["sam_fraction"] < 0.5


def test_perturb_norm_on_the_mnist1d_model_with_batchnorm(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["--dataset", "mnist1d", "--model", "cnn1d-bn", "--epochs", "1", "--batch-size", "256", "--quiet"]
    assert (
        main(["train", *args, "--threads", "1", "--optimizer", "looksam", "--perturb", "norm", "--out", str(out)]) == 0
    )
    assert json.loads((out / "config.json").read_text())["perturb"] == "norm"
    assert json.loads((out / "final.json").read_text())["test_acc"] > 0.15


def test_the_runner_builds_the_subset_groups() -> None:
    config = RunConfig(dataset="synthetic", optimizer="aesam", perturb="net.1,net.5.bias", epochs=1).validate()
    trainer = build_trainer(config, load_data(config))
    groups = trainer.optimizer.param_groups
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    assert [([names[id(p)] for p in g["params"]], g["sam_perturb"]) for g in groups] == [
        (["net.1.weight", "net.1.bias", "net.5.bias"], True),
        (["net.3.weight", "net.3.bias", "net.5.weight"], False),
    ]
    assert isinstance(trainer.optimizer, torch.optim.Optimizer)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--optimizer", "latesam", "--sam-start", "1.5"], "sam_start must be a number in [0, 1], got 1.5"),
        (["--optimizer", "sgd", "--perturb", "norm"], "perturb='norm' restricts SAM's perturbation; optimizer 'sgd'"),
        (["--optimizer", "sam", "--perturb", "norm"], "model 'cnn1d' has none; use a model with them (cnn, cnn1d-bn"),
        (["--optimizer", "sam", "--perturb", " "], "perturb must be 'all', 'norm' or comma-separated"),
        (
            ["--optimizer", "sam", "--perturb", "features.9", "--dataset", "synthetic"],
            "no parameter of MLP is named or under 'features.9'",
        ),
    ],
)
def test_bad_settings_are_one_line_errors(args: list[str], message: str, tmp_path: Path, capsys) -> None:
    assert main(["train", *args, "--epochs", "1", "--quiet", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
