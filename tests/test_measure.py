"""``sharpness measure``: curvature of a trained run against a dense Hessian, the outputs, and bad input."""

from __future__ import annotations

import copy
import json
import math
import shlex
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from torch.func import functional_call

from sharpness.cli import main
from sharpness.curvature import HessianOperator, top_eigenvalues
from sharpness.experiments.config import build_config
from sharpness.experiments.measure import WHAT, measure
from sharpness.experiments.runner import LAUNCH_RECORD, build_trainer, load_data
from sharpness.train import load_checkpoint

N = 64  # the measurement set: the first 64 training examples
BLOCK = "net.5"  # the synthetic run's MLP output layer: 4 × 256 + 4 = 1028 parameters, small enough to go dense
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("measure") / "run"
    assert main(["train", "--dataset", "synthetic", "--epochs", "1", "--quiet", "--out", str(run_dir)]) == 0
    return run_dir


def _trained_model(run_dir: Path) -> tuple[torch.nn.Module, object, torch.Tensor, torch.Tensor]:
    """The run's model with its checkpoint's weights and the first N training examples, rebuilt here."""
    saved = json.loads((run_dir / "config.json").read_text())
    for key in ("kind", *LAUNCH_RECORD):  # not settings: the kind of folder and how the run was launched
        saved.pop(key)
    config = build_config(saved, compare=False)
    data = load_data(config)
    trainer = build_trainer(config, data)
    trainer.model.load_state_dict(load_checkpoint(run_dir)["model"])
    return trainer.model, trainer.loss_fn, data.x_train[:N], data.y_train[:N]


def _dense_block_hessian(run_dir: Path, prefix: str) -> torch.Tensor:
    """The Hessian of the mean loss over the N examples w.r.t. the parameters under ``prefix``, by torch.func in
    float64 (independent of the package's Hessian-vector products)."""
    model, loss_fn, x, y = _trained_model(run_dir)
    model = copy.deepcopy(model).double().eval()
    x = x.double()
    names = [name for name, _ in model.named_parameters() if name.startswith(prefix + ".")]
    fixed = {name: p.detach() for name, p in model.named_parameters() if name not in names}
    shapes = [model.get_parameter(name).shape for name in names]
    theta = torch.cat([model.get_parameter(name).detach().reshape(-1) for name in names])

    def loss_of(flat: torch.Tensor) -> torch.Tensor:
        chunks = flat.split([s.numel() for s in shapes])
        weights = {**fixed, **{n: c.view(s) for n, c, s in zip(names, chunks, shapes, strict=True)}}
        return loss_fn(functional_call(model, weights, (x,)), y)

    return torch.func.hessian(loss_of)(theta)


def _measure_cli(run_dir: Path | str, out: Path, *flags: str) -> dict:
    assert main(["measure", str(run_dir), "--measure-size", str(N), "--out", str(out), *flags]) == 0
    return json.loads((out / "measure.json").read_text())


def test_measure_matches_the_dense_hessian_of_the_output_layer(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "block"
    result = _measure_cli(run, out, "--what", "eig,trace,frobenius,density", "--params", BLOCK, "--trace-matvecs", "60")
    printed = capsys.readouterr().out
    hessian = _dense_block_hessian(run, BLOCK)
    exact = torch.linalg.eigvalsh(hessian).flip(0)  # largest first
    s = result["settings"]
    assert s["num_examples"] == N and s["num_parameters"] == hessian.shape[0] == 1028 and s["params"] == [BLOCK]

    eig = result["eig"]
    assert eig["eigenvalues"][0] == pytest.approx(float(exact[0]), rel=1e-4)
    assert eig["eigenvalues"] == pytest.approx(exact[:5].tolist(), rel=1e-4, abs=1e-6)
    assert all(eig["converged"]) and len(eig["residuals"]) == 5 and eig["hvps"] == eig["iterations"]
    assert eig["bulk_ratio"] == pytest.approx(float(exact[0] / exact[4]), rel=1e-3)

    trace = float(torch.trace(hessian))
    for key in ("hutchpp", "hutchinson"):
        estimate = result["trace"][key]
        assert abs(estimate["value"] - trace) <= 4 * estimate["stderr"], (key, estimate, trace)
        assert estimate["hvps"] == 60 and estimate["seconds"] >= 0
    frob = result["frobenius"]
    assert abs(frob["value"] - float(torch.linalg.matrix_norm(hessian))) <= 4 * frob["stderr"]

    density = result["density"]
    grid, values = torch.tensor(density["grid"]), torch.tensor(density["density"])
    assert float(torch.trapezoid(values, grid)) == pytest.approx(1.0, abs=1e-3)
    assert min(density["grid"]) <= float(exact[-1]) and max(density["grid"]) >= float(exact[0])
    assert density["hvps"] == 10 * 80
    assert (out / "spectral_density.png").read_bytes()[:8] == PNG
    assert result["files"] == [str(out / "measure.json"), str(out / "spectral_density.png")]

    # the printed table carries the figures
    for text in ("λ1", "λ5", "λ1/λ5", "trace (Hutch++)", "trace (Hutchinson)", "Frobenius norm", "spectral density"):
        assert text in printed
    assert f"{eig['eigenvalues'][0]:.6g}" in printed and "converged" in printed
    assert f"± {result['trace']['hutchpp']['stderr']:.3g}" in printed


def test_whole_model_eigenvalues_agree_with_lanczos_and_interlace_the_block(run: Path, tmp_path: Path) -> None:
    """All 72k parameters are too many for a dense Hessian: check λ1 against an independent Lanczos run (other
    start vector, the operator built here) and Cauchy interlacing (λ1 of a diagonal block <= λ1 of the whole)."""
    whole = _measure_cli(run, tmp_path / "whole", "--what", "eig", "--top-k", "2")["eig"]["eigenvalues"]
    model, loss_fn, x, y = _trained_model(run)
    reference = top_eigenvalues(
        HessianOperator(model, loss_fn, (x, y)), k=2, generator=torch.Generator().manual_seed(123)
    ).eigenvalues
    assert whole == pytest.approx(reference.tolist(), rel=1e-4)
    block = torch.linalg.eigvalsh(_dense_block_hessian(run, BLOCK))[-1]
    assert whole[0] >= float(block) * (1 - 1e-5)


def test_checkpoint_path_default_out_and_python_api(run: Path, tmp_path: Path) -> None:
    rng = torch.random.get_rng_state()
    checkpoint_bytes = (run / "checkpoint.pt").read_bytes()
    # a checkpoint file inside a run folder works like the folder; the default output folder is RUN_DIR/measure
    assert main(["measure", str(run / "checkpoint.pt"), "--what", "eig", "--top-k", "1", "--measure-size", "32"]) == 0
    from_file = json.loads((run / "measure" / "measure.json").read_text())
    from_dir = measure(run, "eig", top_k=1, measure_size=32, out=tmp_path / "dir")
    assert from_file["eig"]["eigenvalues"] == from_dir["eig"]["eigenvalues"]  # same seed, same model, same data
    assert from_file["checkpoint"] == str(run / "checkpoint.pt") and from_file["epoch"] == 1
    assert not (run / "measure" / "spectral_density.png").exists()  # no density asked for
    # the other backend and train mode (the MLP has no BatchNorm/dropout: the same Hessian)
    other = measure(
        run, ["eig"], top_k=1, measure_size=32, backend="forward_over_reverse", mode="train", out=tmp_path / "o"
    )
    assert other["eig"]["eigenvalues"][0] == pytest.approx(from_dir["eig"]["eigenvalues"][0], rel=1e-4)
    # more examples than the split holds: all of them; the test split is another measurement set
    big = measure(run, "eig", top_k=1, measure_size=10**6, split="test", out=tmp_path / "big")
    assert big["settings"]["num_examples"] == 256 and big["settings"]["split"] == "test"
    assert big["eig"]["eigenvalues"][0] != from_dir["eig"]["eigenvalues"][0]
    # no side effects: the global RNG and the checkpoint are as they were
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert (run / "checkpoint.pt").read_bytes() == checkpoint_bytes


def test_sharpness_measurements(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("sharpness.curvature.rho_sharpness")
    flags = ["--what", "sharpness", "--m", "16", "--sharpness-steps", "5", "--sharpness-probes", "5"]
    result = _measure_cli(run, tmp_path, *flags)
    printed = capsys.readouterr().out
    sharp = result["sharpness"]
    assert sharp["rho"] == 0.05 and sharp["m"] == 16 and sharp["adaptive"] is False  # the run's rho; an SGD run
    for key in ("worst", "average", "m_worst", "m_average"):
        assert math.isfinite(sharp[key]["value"]) and sharp[key]["seconds"] >= 0, key
    for key in ("average", "m_worst", "m_average"):
        assert math.isfinite(sharp[key]["stderr"]) and sharp[key]["stderr"] >= 0, key
    assert sharp["worst"]["value"] >= 0 and sharp["worst"]["value"] >= sharp["average"]["value"]
    assert sharp["m_worst"]["num_batches"] == N // 16 and len(sharp["m_worst"]["per_batch"]) == N // 16
    assert "worst-case ρ-sharpness" in printed and "m-sharpness (average, m=16)" in printed
    assert "eig" not in result and "density" not in result


def _error(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err


def test_unknown_what_item_lists_the_valid_ones(run: Path, capsys: pytest.CaptureFixture) -> None:
    err = _error(["measure", str(run), "--what", "eig,hessian"], capsys)
    assert "'hessian'" in err and all(name in err for name in WHAT)
    assert "no measurement" in _error(["measure", str(run), "--what", ","], capsys)


def test_missing_or_foreign_paths_and_corrupt_checkpoints(run: Path, tmp_path: Path, capsys) -> None:
    missing = tmp_path / "nowhere"
    assert str(missing) in _error(["measure", str(missing)], capsys)
    (tmp_path / "empty").mkdir()
    assert "not a sharpness run folder" in _error(["measure", str(tmp_path / "empty")], capsys)
    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copy(run / "config.json", broken / "config.json")
    err = _error(["measure", str(broken)], capsys)
    assert "no checkpoint" in err and f"train it with: sharpness train --resume {broken}" in err
    (broken / "checkpoint.pt").write_bytes(b"not a checkpoint")
    err = _error(["measure", str(broken)], capsys)
    assert "corrupt" in err and str(broken / "checkpoint.pt") in err
    assert "validation split" in _error(["measure", str(run), "--split", "val"], capsys)


def test_an_earlier_measurement_is_not_overwritten_without_force(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "m"
    flags = ["--what", "trace", "--trace-matvecs", "3"]
    _measure_cli(run, out, *flags)
    first = (out / "measure.json").read_bytes()
    err = _error(["measure", str(run), *flags, "--out", str(out)], capsys)
    assert f"{out / 'measure.json'} already exists" in err and "--force" in err and err.count("\n") == 1
    assert (out / "measure.json").read_bytes() == first
    assert _measure_cli(run, out, *flags, "--seed", "1", "--force")["settings"]["seed"] == 1


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--measure-size", "0"], "measure_size must be an integer >= 1"),
        (["--trace-matvecs", "2"], "trace_matvecs must be an integer >= 3"),
        (["--top-k", "0"], "top_k must be an integer >= 1"),
        (["--top-k", "2000000", "--eig-matvecs", "2000000"], "top_k = 2000000 exceeds"),
        (["--rho", "-0.1"], "rho must be a finite number > 0"),
        (["--rho", "nan"], "rho must be a finite number > 0"),
        (["--m", "0"], "m must be an integer >= 1"),
        (["--seed", "-1"], "seed must be an integer >= 0"),
        (["--eig-matvecs", "3", "--top-k", "5"], "eig_matvecs must be >= top_k"),
        (["--params", "nolayer"], "matches no trainable parameter"),
        (["--threads", "0"], "threads must be an integer >= 1"),
    ],
)
def test_bad_numbers_exit_2(run: Path, flags: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    assert message in _error(["measure", str(run), *flags], capsys)


def test_unparsable_flags_are_argparse_errors(run: Path) -> None:
    with pytest.raises(SystemExit) as info:
        main(["measure", str(run), "--top-k", "many"])
    assert info.value.code == 2


def test_the_documented_measure_example_runs_as_written(tmp_path: Path, monkeypatch, capsys) -> None:
    """docs/cli.md's ``measure ... --params`` line, run in a folder holding the comparison it names."""
    docs = (Path(__file__).resolve().parents[1] / "docs" / "cli.md").read_text()
    (line,) = [ln for ln in docs.splitlines() if ln.startswith("sharpness measure runs/cmp/runs/")]
    command = shlex.split(line.split("#")[0])[1:]
    monkeypatch.chdir(tmp_path)
    compare = ["compare", "--epochs", "1", "--seeds", "1", "--optimizers", "sam", "--threads", "1", "--quiet"]
    assert main([*compare, "--out", "runs/cmp"]) == 0  # MNIST-1D with its default model, as in the docs
    assert main(command) == 0
    result = json.loads(Path(command[command.index("--out") + 1], "measure.json").read_text())
    assert result["settings"]["params"] == ["head"] and result["settings"]["split"] == "test"
    # and the comparison folder itself is refused with its runs named
    assert main(["measure", "runs/cmp"]) == 2
    err = capsys.readouterr().err
    assert "is a comparison folder" in err and "sam-rho0.05-seed0" in err and len(err.strip().splitlines()) == 1


def test_every_measurement_name_has_an_estimator() -> None:
    from sharpness.experiments.measure import DEFAULT_WHAT, ESTIMATORS

    assert tuple(ESTIMATORS) == WHAT and set(DEFAULT_WHAT) <= set(WHAT)


OLD_COUNTS = {"samples": 3, "max_iter": 6, "density_vectors": 2, "density_steps": 5, "sharpness_samples": 2}
NEW_COUNTS = {"trace_matvecs": 3, "eig_matvecs": 6, "density_probes": 2, "density_matvecs_per_probe": 5,
              "sharpness_probes": 2}  # fmt: skip


def _numbers(result: dict) -> dict:
    """``result`` without what may differ between two identical measurements: timings and paths."""
    if isinstance(result, dict):
        return {k: _numbers(v) for k, v in result.items() if k not in ("seconds", "files", "checkpoint", "run_dir")}
    return result


def test_old_count_names_measure_the_same_and_warn(run: Path, tmp_path: Path, capsys) -> None:
    """The counts' old names (docs/curvature.md, "Counts"): as arguments and as flags, the same ``measure.json``
    bit for bit; the new names raise no DeprecationWarning anywhere in the package's code paths."""
    common = {"what": "all", "measure_size": 32, "top_k": 2, "m": 16, "sharpness_steps": 2}
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        new = measure(run, **common, **NEW_COUNTS, out=tmp_path / "new")
    with pytest.warns(DeprecationWarning, match="measure's argument .* is deprecated") as record:
        old = measure(run, **common, **OLD_COUNTS, out=tmp_path / "old")
    assert sorted(str(w.message).split("'s argument ")[1].split()[0] for w in record) == sorted(OLD_COUNTS)
    assert _numbers(old) == _numbers(new)
    assert new["settings"]["samples"] == 3 and new["settings"]["max_iter"] == 6  # measure.json keeps its keys
    assert new["density"]["num_vectors"] == 2 and new["density"]["lanczos_steps"] == 5
    assert new["trace"]["hutchinson"]["num_samples"] == new["trace"]["hutchinson"]["hvps"] == 3
    with pytest.raises(TypeError, match="got both 'samples' and 'trace_matvecs'"):
        measure(run, "trace", samples=3, trace_matvecs=3, check_only=True)
    capsys.readouterr()
    flags = ["--what", "trace,density", "--top-k", "2"]
    by_new = _measure_cli(run, tmp_path / "cli-new", *flags, "--trace-matvecs", "3", "--density-probes", "2")
    assert capsys.readouterr().err == ""
    by_old = _measure_cli(run, tmp_path / "cli-old", *flags, "--samples", "3", "--density-vectors", "2")
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "sharpness: --samples is deprecated and will be removed in the next release; use --trace-matvecs",
        "sharpness: --density-vectors is deprecated and will be removed in the next release; use --density-probes",
    ]
    assert _numbers(by_old) == _numbers(by_new)
