"""The CLI and its files: resume rules, one-line errors that change nothing, Ctrl-C, strict JSON, file modes,
and checkpoints that would run code."""

from __future__ import annotations

import ast
import json
import math
import os
import pathlib
import shutil
from pathlib import Path

import pytest
import torch

import sharpness
import sharpness.experiments.runner as runner
from sharpness.cli import main
from sharpness.train import Callback, write_json

TINY = ["--dataset", "synthetic", "--epochs", "1", "--batch-size", "32", "--threads", "1", "--quiet"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished one-epoch ``train`` run (``train``) and a one-seed SGD ``compare`` (``cmp``); copy before changing."""
    root = tmp_path_factory.mktemp("runs")
    assert main(["train", *TINY, "--out", str(root / "train")]) == 0
    assert main(["compare", *TINY, "--optimizers", "sgd", "--seeds", "1", "--out", str(root / "cmp")]) == 0
    return root


def _copy(runs: Path, name: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(runs / name, tmp_path / name))


def _snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every path under ``folder`` with its bytes (``None`` for folders): what 'nothing changed' compares."""
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


def _fails(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    """Run the CLI, expect exit 2 and a one-line error; returns the line."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("sharpness: error: ") and err.count("\n") == 1, err
    return err


def _strict(text: str) -> object:
    """``json.loads`` that refuses NaN and Infinity (which Python's json writes by default)."""

    def refuse(constant: str) -> None:
        raise ValueError(f"not strict JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


# ----------------------------------------------------------------------------- resume rules


@pytest.mark.parametrize(
    ("run", "flags", "messages"),
    [
        ("train", ["--epochs", "100"], ["--epochs 100 differs from the run's saved epochs 1"]),
        (
            "train",
            ["--optimizer", "sam", "--lr", "0.1", "--threads", "2"],
            ["--optimizer sam differs from the run's saved optimizer sgd", "--lr 0.1 differs from the run's saved lr"],
        ),
        ("train", ["--model", "cnn1d"], ["--model cnn1d differs from the run's saved model mlp"]),
        ("train", ["--out", "elsewhere"], ["--out elsewhere differs from the run folder"]),
        ("cmp", ["--seeds", "5"], ["--seeds 5 differs from the run's saved seeds 1"]),
        ("cmp", ["--optimizers", "sgd,sam"], ["--optimizers sgd,sam differs from the run's saved optimizers sgd"]),
    ],
)
def test_resume_refuses_settings_that_differ_from_the_saved_run(
    runs: Path, tmp_path: Path, capsys: pytest.CaptureFixture, run: str, flags: list[str], messages: list[str]
) -> None:
    folder = _copy(runs, run, tmp_path)
    before = _snapshot(folder)
    command = "train" if run == "train" else "compare"
    err = _fails([command, "--resume", str(folder), "--quiet", *flags], capsys)
    assert all(message in err for message in messages), err
    assert "continues with its saved settings" in err and "start a new run with --out" in err
    assert _snapshot(folder) == before


def test_resume_accepts_the_saved_values_and_runtime_settings(runs: Path, tmp_path: Path) -> None:
    folder = _copy(runs, "train", tmp_path)
    final = json.loads((folder / "final.json").read_text())
    threads = torch.get_num_threads()
    try:  # the saved values (the model as the dataset's default), and --threads, which may change
        assert (
            main(["train", "--resume", str(folder), "--epochs", "1", "--model", "mlp", "--threads", "2", "--quiet"])
            == 0
        )
    finally:
        torch.set_num_threads(threads)
    assert json.loads((folder / "final.json").read_text())["test_acc"] == final["test_acc"]


# ----------------------------------------------------------------------------- bad input: one line, nothing changed


def _foreign_model(state: dict) -> None:
    state["model"] = {"w": torch.zeros(2)}


def _no_model(state: dict) -> None:
    del state["model"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_foreign_model, "the weights do not fit the MLP model: missing net.1.weight"),
        (_no_model, "is not a complete sharpness training checkpoint: it lacks 'model'"),
    ],
)
def test_resume_with_another_runs_checkpoint_is_one_line(
    runs: Path, tmp_path: Path, capsys: pytest.CaptureFixture, change, message: str
) -> None:
    folder = _copy(runs, "train", tmp_path)
    state = torch.load(folder / "checkpoint.pt", weights_only=True)
    change(state)
    torch.save(state, folder / "checkpoint.pt")
    before = _snapshot(folder)
    err = _fails(["train", "--resume", str(folder), "--quiet"], capsys)
    assert message in err and str(folder / "checkpoint.pt") in err
    assert _snapshot(folder) == before


def test_a_finished_run_without_its_checkpoint_is_not_resumed(
    runs: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    folder = _copy(runs, "train", tmp_path)
    (folder / "checkpoint.pt").unlink()
    before = _snapshot(folder)
    err = _fails(["train", "--resume", str(folder), "--quiet"], capsys)
    assert "the run has finished (final.json) but its checkpoint.pt is missing" in err and "--out" in err
    assert _snapshot(folder) == before


def test_a_corrupt_config_json_is_named(runs: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder = _copy(runs, "train", tmp_path)
    (folder / "config.json").write_text('{"kind": "train", ')
    before = _snapshot(folder)
    for argv in (["train", "--resume", str(folder)], ["measure", str(folder)], ["report", str(folder)]):
        err = _fails(argv, capsys)
        assert f"{folder / 'config.json'} is not readable JSON" in err and "restore the file" in err
    assert _snapshot(folder) == before


def test_bad_device_in_a_config_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "cfg.toml").write_text("device = 3\n")
    err = _fails(["train", *TINY, "--config", str(tmp_path / "cfg.toml"), "--out", str(tmp_path / "run")], capsys)
    assert "device must be 'cpu' or 'cuda[:N]', got 3" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg.toml"]


@pytest.mark.parametrize("command", ["train", "compare"])
def test_cuda_without_cuda_fails_before_anything_is_created(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, command: str
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a machine without CUDA
    monkeypatch.chdir(tmp_path)  # the default run folder would be runs/... here
    err = _fails([command, *TINY, "--device", "cuda"], capsys)
    assert "device 'cuda' is not available here (torch sees 0 CUDA device(s)); pass --device cpu" in err
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- Ctrl-C and restarts


def _add_callback(monkeypatch: pytest.MonkeyPatch, callback: Callback, *, first: bool = False) -> None:
    """Give the next runs ``callback``: before their metrics logger and checkpointer (``first``) or after them."""
    original = runner.build_trainer

    def build(config, data, callbacks=()):
        return original(config, data, [callback, *callbacks] if first else [*callbacks, callback])

    monkeypatch.setattr(runner, "build_trainer", build)


class _CtrlC(Callback):
    """Raises KeyboardInterrupt, as Ctrl-C does, after ``steps`` optimizer steps."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def on_step_end(self, trainer, step):
        if step.step == self.steps:
            raise KeyboardInterrupt


def test_ctrl_c_in_a_comparison_names_the_resume_command(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "cmp"
    _add_callback(monkeypatch, _CtrlC(steps=2))
    assert main(["compare", *TINY, "--optimizers", "sgd", "--seeds", "1", "--out", str(out)]) == 130
    assert capsys.readouterr().err == f"sharpness: interrupted; resume with: sharpness compare --resume {out}\n"
    monkeypatch.undo()
    assert main(["compare", "--resume", str(out), "--quiet"]) == 0
    assert (out / "summary.json").is_file()


def test_a_run_interrupted_before_its_first_checkpoint_resumes_from_the_start(
    runs: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    _add_callback(monkeypatch, _CtrlC(steps=1))
    assert main(["train", *TINY, "--out", str(out)]) == 130
    assert capsys.readouterr().err == f"sharpness: interrupted; resume with: sharpness train --resume {out}\n"
    assert (out / "config.json").is_file() and not (out / "checkpoint.pt").exists()
    monkeypatch.undo()
    assert main(["train", "--resume", str(out), "--quiet"]) == 0
    assert f"{out} has no checkpoint (the run stopped before its first one): training it from the start" in (
        capsys.readouterr().out
    )
    # the same run as an unbroken one: it is deterministic
    final = json.loads((out / "final.json").read_text())
    timings = {key: final[key] for key in ("train_seconds", "train_cpu_seconds")}  # the only figures that differ
    assert final == {**json.loads((runs / "train" / "final.json").read_text()), **timings}


# ----------------------------------------------------------------------------- strict JSON and file modes


def test_json_files_are_strict_with_null_for_non_finite_numbers(
    runs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # one seed: the 95% interval is undefined (NaN), written as null
    summary = _strict((runs / "cmp" / "summary.json").read_text())
    assert summary["rows"][0]["test_acc_ci95"] is None

    class NaNMetric(Callback):
        def on_epoch_end(self, trainer, record):
            record.update(train_loss=math.nan, probe=-math.inf)

    _add_callback(monkeypatch, NaNMetric(), first=True)  # before the metrics logger
    out = tmp_path / "run"
    assert main(["train", *TINY, "--out", str(out)]) == 0  # the report draws the NaN as a gap
    (row,) = [_strict(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert row["train_loss"] is None and row["probe"] is None and row["test_acc"] > 0

    write_json({"a": math.nan, "b": [math.inf, 1.5], "c": {"d": -math.inf}}, tmp_path / "x.json")
    assert _strict((tmp_path / "x.json").read_text()) == {"a": None, "b": [None, 1.5], "c": {"d": None}}


def test_files_are_created_with_the_users_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        assert main(["train", *TINY, "--out", str(tmp_path / "run")]) == 0
        modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "run").iterdir() if p.is_file()}
        assert {"checkpoint.pt", "config.json", "final.json", "metrics.jsonl"} <= set(modes)
        assert set(modes.values()) == {0o644}, modes
        os.umask(0o077)
        write_json({}, tmp_path / "private.json")
        assert (tmp_path / "private.json").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)


# ----------------------------------------------------------------------------- checkpoints that would run code


class _RunsCode:
    """Unpickling this writes ``marker``: what a malicious checkpoint does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.write_text, (pathlib.Path(self.marker), "code ran"))


def test_a_checkpoint_that_would_run_code_is_refused(runs: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder = _copy(runs, "train", tmp_path)
    state = torch.load(folder / "checkpoint.pt", weights_only=True)
    control = tmp_path / "control.pt"
    torch.save({**state, "model": _RunsCode(tmp_path / "control-marker")}, control)
    torch.load(control, weights_only=False)  # the payload is live: an unsafe load runs it
    assert (tmp_path / "control-marker").read_text() == "code ran"

    marker = tmp_path / "marker"
    torch.save({**state, "model": _RunsCode(marker)}, folder / "checkpoint.pt")
    before = _snapshot(folder)
    for argv in (["train", "--resume", str(folder), "--quiet"], ["measure", str(folder), "--what", "trace"]):
        err = _fails(argv, capsys)
        assert f"checkpoint {folder / 'checkpoint.pt'} refers to Python code" in err and "refused" in err
        assert not marker.exists()
    assert _snapshot(folder) == before


def test_every_torch_load_in_the_package_is_weights_only() -> None:
    calls = 0
    for path in Path(sharpness.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load":
                calls += 1
                keywords = {k.arg: k.value for k in node.keywords}
                assert isinstance(keywords.get("weights_only"), ast.Constant), f"{path}: {ast.unparse(node)}"
                assert keywords["weights_only"].value is True, f"{path}: {ast.unparse(node)}"
    assert calls >= 1
