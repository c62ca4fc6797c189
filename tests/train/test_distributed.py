"""Data-parallel training from the command line: real processes (gloo on CPU), each run under a hard timeout.

``--nproc-per-node 2`` must see the data of a one-process run (so SGD ends at the same weights), rank 0 alone
writes the folder, the ``torchrun`` form works, a dead rank stops the job with a message and a checkpoint that
``--resume`` continues with another number of processes, and a global batch the processes cannot share is a
one-line error.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sharpness.cli import main
from sharpness.train import load_checkpoint
from sharpness.train.distributed import FAULT_ENV, TIMEOUT_ENV, check_global_batch, shard

BIN = Path(sys.executable).parent
TINY = ["--dataset", "synthetic", "--epochs", "1", "--batch-size", "32", "--quiet"]
# tensorboard/: the event files (tensorboard is installed in the test environment, through the integrations extra)
RUN_FILES = {"checkpoint.pt", "config.json", "curves.png", "final.json", "metrics.csv", "metrics.jsonl", "report.html"}
RUN_FILES |= {"tensorboard"}


def _run(*command: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """``command`` in its own session, killed with every process it started if it outlives ``timeout``.

    The launcher gets SIGTERM first (its agent then stops the workers, which run in sessions of their own); the
    collective timeout bounds any worker that would still wait for a peer.
    """
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", TIMEOUT_ENV: "60", **(env or {})}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                               start_new_session=True)  # fmt: skip
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            out, err = process.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            out, err = process.communicate()
        pytest.fail(f"{' '.join(command)} ran past {timeout} s\nstdout:\n{out}\nstderr:\n{err}")
    return subprocess.CompletedProcess(command, process.returncode, out, err)


def _sharpness(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return _run(str(BIN / "sharpness"), *args, **kwargs)


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_train_on_the_data_of_one(tmp_path: Path) -> None:
    """SGD, global batch 32 over 2 processes, with a validation split so that the last batch (461 mod 32 = 13)
    splits unevenly (7 + 6): the same weights and metrics as one process, up to float32 rounding of the
    gradient's average, and one set of files, written by rank 0."""
    args = [*TINY, "--optimizer", "sgd", "--val-split", "0.1"]
    assert main(["train", *args, "--threads", "1", "--out", str(tmp_path / "one")]) == 0
    result = _sharpness("train", *args, "--nproc-per-node", "2", "--out", str(tmp_path / "two"))
    assert result.returncode == 0, result.stderr
    one, two = tmp_path / "one", tmp_path / "two"
    assert {p.name for p in two.iterdir()} == RUN_FILES
    assert result.stdout.count("run folder:") == 1  # rank 0 alone prints
    config = json.loads((two / "config.json").read_text())
    assert (config["world_size"], config["replica_batch"]) == (2, 16)
    weights_one, weights_two = load_checkpoint(one)["model"], load_checkpoint(two)["model"]
    for name, tensor in weights_one.items():
        torch.testing.assert_close(weights_two[name], tensor, rtol=0, atol=1e-6)
    (row_one,), (row_two,) = _rows(one), _rows(two)
    final_one, final_two = (json.loads((d / "final.json").read_text()) for d in (one, two))
    for key in ("train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc"):
        assert row_two[key] == pytest.approx(row_one[key], rel=1e-6), key
        assert final_two[key] == pytest.approx(final_one[key], rel=1e-6), key
    assert row_two["step"] == row_one["step"] == 15
    assert main(["measure", str(two), "--what", "trace", "--trace-matvecs", "3", "--measure-size", "64"]) == 0


def test_torchrun_form_trains_sam_and_tracks_sharpness_over_both_processes(tmp_path: Path) -> None:
    """Each process measures its half of the measurement set and the Hessian-vector products are all-reduced, so
    the tracked λ_max and ||g|| are those of a one-process run (which measures the whole set), up to float32 rounding
    (SAM with per-replica ε is m-sharpness with m = 16 here: the one-process run uses --micro-batch 16)."""
    out, one = tmp_path / "run", tmp_path / "one"
    args = [*TINY, "--optimizer", "sam", "--track-sharpness-every", "8"]
    result = _run(
        str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2", "--no-python",
        "sharpness", "train", *args, "--out", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert {p.name for p in out.iterdir()} == RUN_FILES | {"sharpness.jsonl", "sharpness.png"}
    (row,) = _rows(out)
    assert row["passes_per_step"] == 2.0 and row["step"] == 16
    tracked = [json.loads(line) for line in (out / "sharpness.jsonl").read_text().splitlines()]
    assert [line["step"] for line in tracked] == [8, 16]
    assert row["sharpness_lambda_max"] == tracked[-1]["lambda_max"]
    assert json.loads((out / "config.json").read_text())["world_size"] == 2
    assert main(["train", *args, "--micro-batch", "16", "--threads", "1", "--out", str(one)]) == 0
    reference = [json.loads(line) for line in (one / "sharpness.jsonl").read_text().splitlines()]
    for mine, theirs in zip(tracked, reference, strict=True):
        for key in ("lambda_max", "grad_norm", "loss"):
            assert mine[key] == pytest.approx(theirs[key], rel=1e-4), key
        assert mine["edge_kind"] == theirs["edge_kind"] == "sam+momentum (bound)"  # per-replica ε: m-sharpness


def test_a_dead_rank_stops_the_job_and_resume_finishes_it_in_one_process(tmp_path: Path) -> None:
    """Rank 1 dies after step 20 (of 2 x 16): the job fails naming it and the resume command; the checkpoint of
    epoch 1 is kept, and one process finishes the run from it."""
    out = tmp_path / "run"
    args = [*TINY, "--epochs", "2", "--optimizer", "sam", "--out", str(out)]
    result = _sharpness("train", *args, "--nproc-per-node", "2", env={FAULT_ENV: "1:20"})
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert "rank 1 exited with status 1" in last
    assert f"resume with: sharpness train --resume {out} --nproc-per-node 2" in last
    assert not (out / "final.json").exists()
    assert load_checkpoint(out)["train_state"]["epoch"] == 1
    assert main(["train", "--resume", str(out), "--quiet"]) == 0
    assert [row["epoch"] for row in _rows(out)] == [1, 2]
    assert json.loads((out / "final.json").read_text())["epochs"] == 2
    assert json.loads((out / "config.json").read_text())["world_size"] == 1


def test_fsdp_sam_trains_on_the_data_of_one_and_resumes_sharded(tmp_path: Path) -> None:
    """SAM on a model sharded over 2 processes (``--fsdp``: ε from the reduced gradient, i.e. of the global batch)
    is one-process SAM up to float32 rounding, in weights, optimizer state and metrics. Rank 1 dies in epoch 2; the
    checkpoint of epoch 1 (gathered from the shards, in the unsharded layout) resumes sharded to the same end."""
    args = [*TINY, "--epochs", "2", "--optimizer", "sam", "--val-split", "0.1"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["train", *args, "--threads", "1", "--out", str(one)]) == 0
    failed = _sharpness("train", *args, "--fsdp", "--nproc-per-node", "2", "--out", str(two), env={FAULT_ENV: "1:20"})
    assert failed.returncode == 1 and f"--resume {two} --nproc-per-node 2" in failed.stderr
    assert load_checkpoint(two)["train_state"]["epoch"] == 1
    resumed = _sharpness("train", "--resume", str(two), "--fsdp", "--nproc-per-node", "2", "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    state_one, state_two = load_checkpoint(one), load_checkpoint(two)
    for name, tensor in state_one["model"].items():
        torch.testing.assert_close(state_two["model"][name], tensor, rtol=0, atol=1e-6)
    momenta = [[s["momentum_buffer"] for _, s in sorted(c["optimizer"]["state"].items())]
               for c in (state_one, state_two)]  # fmt: skip
    torch.testing.assert_close(momenta[1], momenta[0], rtol=0, atol=1e-6)
    assert state_two["optimizer"]["param_groups"][0]["sam"] == state_one["optimizer"]["param_groups"][0]["sam"]
    final_one, final_two = (json.loads((d / "final.json").read_text()) for d in (one, two))
    for key in ("train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc", "passes"):
        assert final_two[key] == pytest.approx(final_one[key], rel=1e-5), key
    assert [row["epoch"] for row in _rows(two)] == [1, 2]


def test_measure_in_two_processes_equals_one(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """``measure --nproc-per-node 2``: each process holds part of an odd-sized measurement set (151 + 150), the
    products are all-reduced with example weights, the estimators draw the same vectors: every figure equals the
    one-process measurement up to float32 rounding; rank 0 alone writes and prints."""
    run = tmp_path / "run"
    assert main(["train", *TINY, "--threads", "1", "--out", str(run)]) == 0
    flags = ["--what", "eig,trace,frobenius,density", "--trace-matvecs", "6", "--density-probes", "2"]
    flags += ["--density-matvecs-per-probe", "8", "--measure-size", "301", "--top-k", "3"]
    assert main(["measure", str(run), *flags, "--threads", "1", "--out", str(tmp_path / "one")]) == 0
    result = _sharpness("measure", str(run), *flags, "--nproc-per-node", "2", "--out", str(tmp_path / "two"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("wrote") == 2  # measure.json and the density figure, once
    one, two = (json.loads((tmp_path / name / "measure.json").read_text()) for name in ("one", "two"))
    assert (one["settings"]["num_examples"], two["settings"]["processes"]) == (301, 2)
    figures = [
        (m["loss"], m["grad_norm"], *m["eig"]["eigenvalues"], m["trace"]["hutchpp"]["value"],
         m["trace"]["hutchinson"]["value"], m["frobenius"]["value"], *m["density"]["density"])
        for m in (one, two)
    ]  # fmt: skip
    assert figures[1] == pytest.approx(figures[0], rel=1e-5, abs=1e-6)  # float32 products, summed in another order
    assert main(["measure", str(run), "--what", "sharpness", "--nproc-per-node", "2"]) == 2
    assert "--what sharpness (ρ-sharpness) runs in one process" in capsys.readouterr().err


def test_compare_in_two_processes(tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    result = _sharpness("compare", *TINY, "--seeds", "1", "--nproc-per-node", "2", "--out", str(out))
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert [row["passes_per_step_mean"] for row in summary["rows"]] == [1.0, 2.0]
    for run in ("sgd-seed0", "sam-rho0.05-seed0"):
        assert json.loads((out / "runs" / run / "config.json").read_text())["replica_batch"] == 16


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--batch-size", "33"], "the batch size 33 (the global batch) is not divisible by the 2 processes"),
        (["--optimizer", "sam", "--micro-batch", "4"], "micro_batch (--micro-batch) is for one process"),
        (["--nproc-per-node", "0"], "--nproc-per-node must be an integer >= 1, got 0"),
        (["--fsdp", "--track-sharpness-every", "5"], "cannot measure a model sharded by FSDP (--fsdp)"),
    ],
)
def test_settings_processes_cannot_run_are_one_line_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture, flags: list[str], message: str
) -> None:
    """Checked by the launcher before any process starts: exit 2, one line, nothing written."""
    out = tmp_path / "run"
    assert main(["train", *TINY, "--nproc-per-node", "2", *flags, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert not out.exists()


def test_shards_are_contiguous_and_cover_the_batch() -> None:
    x, y = torch.arange(13.0).unsqueeze(1), torch.arange(13)
    parts = [shard(x, y, rank, 2) for rank in range(2)]
    assert [part[1].tolist() for part in parts] == [list(range(7)), list(range(7, 13))]
    assert shard(x, y, 0, 1)[1] is y


def test_a_last_batch_smaller_than_the_processes_is_refused() -> None:
    with pytest.raises(ValueError, match=r"the last batch of an epoch has 2 examples \(66 mod 4\), fewer than the 4"):
        check_global_batch(4, 4, n_examples=66)
    check_global_batch(4, 4, n_examples=68)
    check_global_batch(4, 1, micro_batch=2, n_examples=66)
