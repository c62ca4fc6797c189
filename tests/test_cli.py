"""The ``sharpness`` command: compare/train/report on a tiny budget, resume, config files, bad input."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sharpness.cli import main
from sharpness.experiments.runner import build_trainer, load_data
from sharpness.experiments.stats import mean_ci95
from sharpness.train import Callback, load_checkpoint

TINY = ["--dataset", "synthetic", "--epochs", "2", "--batch-size", "32", "--threads", "1", "--quiet"]


def _cli(*args: str) -> subprocess.CompletedProcess:
    """The installed console script, as a user runs it."""
    script = Path(sys.executable).with_name("sharpness")
    return subprocess.run([str(script), *args], capture_output=True, text=True, timeout=300)


def test_compare_through_the_entry_point_writes_a_consistent_run_folder(tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    result = _cli("compare", *TINY, "--seeds", "2", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "sam" in result.stdout and "sgd" in result.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert [row["optimizer"] for row in summary["rows"]] == ["sgd", "sam"]
    for row in summary["rows"]:
        finals = [json.loads((out / "runs" / name / "final.json").read_text()) for name in row["runs"]]
        mean, ci = mean_ci95([f["test_acc"] for f in finals])
        assert row["test_acc_mean"] == pytest.approx(mean) and row["test_acc_ci95"] == pytest.approx(ci)
        assert row["passes_per_step_mean"] == (2.0 if row["optimizer"] == "sam" else 1.0)
        for name in row["runs"]:
            rows = (out / "runs" / name / "metrics.jsonl").read_text().splitlines()
            assert len(rows) == 2
            last = json.loads(rows[-1])
            final = json.loads((out / "runs" / name / "final.json").read_text())
            assert last["test_acc"] == final["test_acc"]  # the same weights, both in eval mode
        # the printed table and the HTML report carry the same numbers
        shown = f"{100 * row['test_acc_mean']:.2f} ± {100 * row['test_acc_ci95']:.2f}"
        assert shown in result.stdout
        assert shown in (out / "report.html").read_text()
        assert row["train_cpu_seconds_mean"] > 0
        assert ("sam_loss_rise_mean" in row) == (row["optimizer"] == "sam")  # SAM's L(w+ε) − L(w), last epoch
    assert "CPU s" in result.stdout and "L(w+ε)−L(w)" in result.stdout
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "%|" not in result.stderr  # --quiet: no progress bar


def test_train_then_report_regenerates_from_the_metrics(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(["train", *TINY, "--optimizer", "sam", "--rho", "0.1", "--out", str(out)]) == 0
    final = json.loads((out / "final.json").read_text())
    assert final["passes_per_step"] == 2.0 and final["epochs"] == 2
    (out / "report.html").unlink()
    (out / "curves.png").unlink()
    result = _cli("report", str(out))
    assert result.returncode == 0, result.stderr
    page = (out / "report.html").read_text()
    assert f"{final['test_acc']:.4g}" in page
    assert (out / "curves.png").is_file()


def test_progress_bar_is_shown_without_quiet(tmp_path: Path) -> None:
    args = [a for a in TINY if a != "--quiet"]
    result = _cli("train", *args, "--epochs", "1", "--out", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr
    assert re.search(r"100%\|.*1/1", result.stderr)


def test_an_error_before_training_starts_prints_alone_without_a_progress_bar(tmp_path: Path) -> None:
    """The bar is drawn when training starts; a model that does not fit the data fails before that."""
    args = [a for a in TINY if a != "--quiet"]
    for command in ("train", "compare"):
        result = _cli(command, *args, "--model", "cnn", "--out", str(tmp_path / command))
        assert result.returncode == 2
        assert result.stderr.splitlines() == [result.stderr.strip()] and "input_shape must be" in result.stderr


def test_version() -> None:
    import sharpness

    result = _cli("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"sharpness {sharpness.__version__}"


def test_resume_through_the_cli_continues_exactly(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Ctrl-C after epoch 2 of 4 exits 130 naming the resume command; ``train --resume``: the same weights as an
    unbroken run."""
    base = ["train", "--dataset", "synthetic", "--optimizer", "sam", "--epochs", "4", "--batch-size", "32", "--quiet"]
    assert main([*base, "--out", str(tmp_path / "whole")]) == 0

    class Stop(Callback):
        def on_epoch_end(self, trainer, record):
            if record["epoch"] == 2:
                raise KeyboardInterrupt

    import sharpness.experiments.runner as runner

    original = runner.build_trainer
    runner.build_trainer = lambda config, data, callbacks=(): original(config, data, [*callbacks, Stop()])
    try:
        assert main([*base, "--out", str(tmp_path / "broken")]) == 130
    finally:
        runner.build_trainer = original
    err = capsys.readouterr().err
    assert err == f"sharpness: interrupted; resume with: sharpness train --resume {tmp_path / 'broken'}\n"
    assert load_checkpoint(tmp_path / "broken")["train_state"]["epoch"] == 2
    assert main(["train", "--resume", str(tmp_path / "broken"), "--quiet"]) == 0

    whole = load_checkpoint(tmp_path / "whole")["model"]
    resumed = load_checkpoint(tmp_path / "broken")["model"]
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    rows = (tmp_path / "broken" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["epoch"] for r in rows] == [1, 2, 3, 4]


def test_config_file_with_flags_overriding(tmp_path: Path) -> None:
    config = tmp_path / "cfg.toml"
    config.write_text('dataset = "synthetic"\nepochs = 3\nbatch-size = 32\nlabel_noise = 0.2\nlr = 0.01\n')
    out = tmp_path / "run"
    assert main(["train", "--config", str(config), "--epochs", "1", "--quiet", "--out", str(out)]) == 0
    saved = json.loads((out / "config.json").read_text())
    assert (saved["epochs"], saved["batch_size"], saved["label_noise"], saved["lr"]) == (1, 32, 0.2, 0.01)


def test_equal_compute_gives_one_pass_optimizers_twice_the_epochs(tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    assert main(["compare", *TINY, "--epochs", "1", "--seeds", "1", "--equal-compute", "--out", str(out)]) == 0
    rows = {row["optimizer"]: row for row in json.loads((out / "summary.json").read_text())["rows"]}
    assert rows["sgd"]["epochs"] == 2 and rows["sam"]["epochs"] == 1


def test_first_seed_shifts_the_seeds_and_matches_a_train_run(tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    assert main(["compare", *TINY, "--epochs", "1", "--seeds", "2", "--first-seed", "3", "--out", str(out)]) == 0
    assert sorted(p.name for p in (out / "runs").iterdir()) == [
        "sam-rho0.05-seed3", "sam-rho0.05-seed4", "sgd-seed3", "sgd-seed4"
    ]  # fmt: skip
    single = tmp_path / "single"
    assert main(["train", *TINY, "--epochs", "1", "--seed", "4", "--out", str(single)]) == 0
    compared = json.loads((out / "runs" / "sgd-seed4" / "final.json").read_text())
    assert compared["test_acc"] == json.loads((single / "final.json").read_text())["test_acc"]


def test_rho_grid_selects_on_validation_and_reports_test(tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    args = ["compare", *TINY, "--epochs", "1", "--seeds", "2", "--optimizers", "sam"]
    assert main([*args, "--val-split", "0.25", "--rho-grid", "0.01,0.5", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    scores = summary["selection"]["sam"]
    chosen = max(scores, key=scores.get)
    (row,) = summary["rows"]
    assert f"{row['rho']:g}" == chosen
    vals = [
        json.loads((out / "runs" / f"sam-rho{r}-seed{s}" / "final.json").read_text())["val_acc"]
        for r in ("0.01", "0.5")
        for s in (0, 1)
    ]
    assert scores == {"0.01": pytest.approx(sum(vals[:2]) / 2), "0.5": pytest.approx(sum(vals[2:]) / 2)}
    assert row["runs"] == [f"sam-rho{chosen}-seed0", f"sam-rho{chosen}-seed1"]


def test_optimizer_settings_apply_to_that_optimizer_only_and_runs_go_seed_by_seed(tmp_path: Path) -> None:
    """A TOML ``[optimizer_settings.msam]`` table gives MSAM its own ρ; the runs train seed by seed (the order of
    their ``final.json`` files), so that runs compared with each other share the machine's state."""
    config = tmp_path / "c.toml"
    config.write_text(
        'optimizers = ["sgd", "sam", "msam"]\nseeds = 2\nrho = 0.05\n[optimizer_settings.msam]\nrho = 0.7\n'
    )
    out = tmp_path / "cmp"
    assert main(["compare", *TINY, "--epochs", "1", "--config", str(config), "--out", str(out)]) == 0
    labels = ["sgd-seed0", "sam-rho0.05-seed0", "msam-rho0.7-seed0", "sgd-seed1", "sam-rho0.05-seed1",
              "msam-rho0.7-seed1"]  # fmt: skip
    finished = sorted(labels, key=lambda label: (out / "runs" / label / "final.json").stat().st_mtime_ns)
    assert finished == labels
    rows = {row["optimizer"]: row for row in json.loads((out / "summary.json").read_text())["rows"]}
    assert (rows["sam"]["rho"], rows["msam"]["rho"]) == (0.05, 0.7)
    assert json.loads((out / "config.json").read_text())["optimizer_settings"] == {"msam": {"rho": 0.7}}


@pytest.mark.parametrize(
    "table, message",
    [
        ("[optimizer_settings.adam]\nlr = 0.1\n", "names 'adam', which is not among the optimizers"),
        ("[optimizer_settings.msam]\nseed = 3\n", "cannot set ['seed']"),
        ("[optimizer_settings.msam]\nwarp = 3\n", "cannot set ['warp']"),
        ("[optimizer_settings.msam]\nrho = -1.0\n", "rho must be a finite number >= 0"),
        ("optimizer_settings = {msam = 3}\n", "must be a table of run settings"),
    ],
)
def test_bad_optimizer_settings_are_one_line_errors(tmp_path: Path, table: str, message: str, capsys) -> None:
    config = tmp_path / "c.toml"
    config.write_text('optimizers = ["sgd", "msam"]\n' + table)
    assert main(["compare", *TINY, "--config", str(config), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and not (tmp_path / "o").exists()


def test_label_noise_is_deterministic_per_seed_in_a_run(tmp_path: Path) -> None:
    from sharpness.experiments.config import RunConfig

    config = RunConfig(dataset="synthetic", label_noise=0.3, seed=4, epochs=1)
    a, b = load_data(config), load_data(config)
    assert torch.equal(a.y_train, b.y_train) and not torch.equal(a.y_train, a.clean_y_train)
    trainer = build_trainer(config, a)
    assert type(trainer.optimizer).__name__ == "SGD"


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--dataset", "imagenet"], "unknown dataset 'imagenet'; valid: mnist1d, digits, cifar10"),
        (["train", "--model", "vgg"], "unknown model 'vgg'"),
        (["train", "--optimizer", "lion"], "unknown optimizer 'lion'; valid: sgd, adam, sam, asam"),
        (["train", "--epochs", "-3"], "epochs must be an integer >= 1"),
        (["train", "--label-noise", "1.0"], "label_noise must be a number in [0, 1)"),
        (["train", "--rho", "-0.1"], "rho must be a finite number >= 0"),
        (["train", "--val-split", "1.5"], "val_split"),
        (["compare", "--rho-grid", ",", "--val-split", "0.1"], "rho_grid is empty"),
        (["compare", "--rho-grid", "0.05,0.1"], "--val-split"),
        (["compare", "--optimizers", "sgd,sgd"], "must not repeat"),
        (["compare", "--first-seed", "-1"], "first_seed must be an integer >= 0"),
        (["train", "--micro-batch", "8"], "micro_batch (m-sharpness) applies to sam and asam"),
        (["train", "--optimizer", "sam", "--micro-batch", "0"], "micro_batch must be an integer >= 1"),
        (["train", "--dataset", "cifar10"], "--data-dir"),
        (["train", "--dataset", "cifar10", "--data-dir", "/nonexistent/cifar"], "/nonexistent/cifar"),
        (["train", "--resume", "/nonexistent/run"], "/nonexistent/run"),
        (["report", "/nonexistent/run"], "/nonexistent/run"),
    ],
)
def test_bad_input_fails_before_training_with_a_clear_message(
    args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "out"
    extra = ["--out", str(out), "--quiet"] if args[0] != "report" else []
    assert main([*args, *extra]) == 2
    assert message in capsys.readouterr().err
    assert not (out / "checkpoint.pt").exists() and not (out / "runs").exists()


def test_corrupt_checkpoint_on_resume_is_named(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    assert main(["train", *TINY, "--epochs", "1", "--out", str(out)]) == 0
    (out / "checkpoint.pt").write_bytes(b"not a checkpoint")
    assert main(["train", "--resume", str(out), "--quiet"]) == 2
    assert f"checkpoint {out / 'checkpoint.pt'} is corrupt" in capsys.readouterr().err


def test_existing_run_folder_is_not_overwritten(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    assert main(["train", *TINY, "--epochs", "1", "--out", str(out)]) == 0
    assert main(["train", *TINY, "--epochs", "1", "--out", str(out)]) == 2
    assert "already holds a run; use --resume" in capsys.readouterr().err


def test_diverging_run_stops_with_a_message_naming_the_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "run"
    assert main(["train", *TINY, "--lr", "1e6", "--schedule", "constant", "--epochs", "3", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "training stopped: the training loss became" in err
    assert str(out / "checkpoint.pt") in err or "no epoch had completed" in err


def test_efficient_sam_variants_from_the_cli(tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    names = "sgd,periodicsam,randomsam,looksam,aesam,aelooksam"
    args = ["compare", *TINY, "--seeds", "1", "--optimizers", names, "--k", "3", "--sam-prob", "0.25"]
    assert main([*args, "--alpha", "0.3", "--out", str(out)]) == 0
    rows = {row["optimizer"]: row for row in json.loads((out / "summary.json").read_text())["rows"]}
    steps = json.loads((out / "runs" / "sgd-seed0" / "final.json").read_text())["steps"]
    for name, row in rows.items():
        # every SAM step costs two passes and every ERM step one, counted through the closure calls
        assert row["passes_per_step_mean"] == pytest.approx(1 + row["sam_fraction_mean"]), name
    assert rows["periodicsam"]["sam_fraction_mean"] == pytest.approx(math.ceil(steps / 3) / steps)
    assert rows["looksam"]["sam_fraction_mean"] == rows["periodicsam"]["sam_fraction_mean"]
    for name in ("randomsam", "aesam", "aelooksam"):
        assert 0 < rows[name]["sam_fraction_mean"] < 1, name
    last = json.loads((out / "runs" / "aesam-rho0.05-seed0" / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"policy_s", "policy_mu", "policy_sigma", "policy_c"} <= set(last)
    assert last["policy_c"] == pytest.approx(-1.0, abs=0.1)  # c_t has moved from λ2 = 1 to λ1 = -1
    last = json.loads((out / "runs" / "randomsam-rho0.05-seed0" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["policy_p"] == 0.25
    saved = json.loads((out / "runs" / "looksam-rho0.05-seed0" / "config.json").read_text())
    assert (saved["k"], saved["alpha"]) == (3, 0.3)


def test_m_sharpness_training_from_the_cli(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(["train", *TINY, "--optimizer", "sam", "--micro-batch", "8", "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["micro_batch"] == 8
    final = json.loads((out / "final.json").read_text())
    assert final["passes_per_step"] == 2 and final["sam_fraction"] == 1
