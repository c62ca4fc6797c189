"""Curvature and sharpness of a trained model, measured from its run folder (``sharpness measure``).

:func:`measure` rebuilds the model of a run folder (``config.json``) with the weights of its ``checkpoint.pt``,
takes a fixed measurement set (the first ``measure_size`` examples of a split, training by default: the loss that
was minimised) and computes, each with its own generator seeded from ``seed``:

- ``eig``: the ``top_k`` largest Hessian eigenvalues by Lanczos, with Ritz residuals and convergence flags, and
  the bulk ratio ``λ_1 / λ_5`` (Foret et al. 2021, §4.2);
- ``trace``: ``tr(H)`` by Hutch++ and by Hutchinson, each with ``trace_matvecs`` products and a standard error;
- ``frobenius``: ``‖H‖_F`` by Hutchinson on ``H²`` with ``trace_matvecs`` products;
- ``density``: the spectral density by stochastic Lanczos quadrature, drawn to ``spectral_density.png`` as a
  log-density against the eigenvalue (as in the SAM paper's Hessian-spectrum figures);
- ``sharpness``: worst-case and average-case ρ-sharpness and m-sharpness (:mod:`sharpness.curvature.rho_sharpness`).

The numbers and the settings go to ``measure.json`` (``null`` where a figure is undefined, e.g. a standard error
from one sample); :func:`format_measurements` renders them as the table the CLI prints. The model is a fresh copy
built for the measurement, and the estimators leave it as they found it.

In a process group of N > 1 processes (``sharpness measure --nproc-per-node N``, or ``torchrun``) every process
holds its contiguous part of the measurement set and each Hessian-vector product is the all-reduced,
example-weighted mean of theirs (``HessianOperator(process_group="default")``); the estimators run unchanged with
the same random vectors on every process, so the figures are those of one process on the whole set (up to the
rounding of the reduction). Rank 0 writes the files. ρ-sharpness (``sharpness``) runs in one process only.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from sharpness._deprecation import renamed_arguments
from sharpness.curvature import (
    HessianOperator,
    bulk_ratio,
    frobenius_norm,
    hutchinson_trace,
    hutchpp_trace,
    spectral_density,
    top_eigenvalues,
)
from sharpness.experiments.compare import RUNS_DIR
from sharpness.experiments.config import RunConfig, build_config, check_choice, check_integer, check_number
from sharpness.experiments.figures import panels, save_figure, styled
from sharpness.experiments.runner import CONFIG_NAME, FINAL_NAME, LAUNCH_RECORD, load_data
from sharpness.models import build_model
from sharpness.train import CHECKPOINT_NAME, load_checkpoint, load_weights, read_json, write_json
from sharpness.train.checkpoint import json_safe
from sharpness.train.distributed import replica_device, shard, world
from sharpness.train.loop import loss_function

__all__ = ["DEFAULT_WHAT", "MEASURE_NAME", "DENSITY_FIGURE", "WHAT", "format_measurements", "measure", "parse_what"]

WHAT = ("eig", "trace", "frobenius", "density", "sharpness")
DEFAULT_WHAT = ("eig", "trace", "frobenius", "density")
SPLITS = ("train", "val", "test")
MEASURE_DIR, MEASURE_NAME, DENSITY_FIGURE = "measure", "measure.json", "spectral_density.png"
# One generator per estimator, seeded seed * _SEED_STRIDE + its index: the figures of one estimator do not depend
# on which others ran, and no two estimators share probe vectors.
_STREAMS = ("eig", "hutchpp", "hutchinson", "frobenius", "density", "worst", "average", "m_worst", "m_average")
_SEED_STRIDE = 100


# ----------------------------------------------------------------------------- settings


def parse_what(what: str | Sequence[str]) -> list[str]:
    """The measurements named by ``what`` (a comma string or a sequence; ``"all"`` = every one), in order."""
    items = what.split(",") if isinstance(what, str) else list(what)
    names: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise ValueError(f"--what items must be strings, got {item!r}")
        name = item.strip().lower()
        if not name:
            continue
        for one in WHAT if name == "all" else (name,):
            if one not in names:
                names.append(one)
    unknown = [name for name in names if name not in WHAT]
    if unknown:
        raise ValueError(f"unknown --what item(s) {', '.join(map(repr, unknown))}; valid: {', '.join(WHAT)} (or all)")
    if not names:
        raise ValueError(f"--what names no measurement; valid: {', '.join(WHAT)} (or all)")
    return names


# ----------------------------------------------------------------------------- loading


def _locate(path: str | Path) -> tuple[Path, Path]:
    """``(run_dir, checkpoint)`` for a run folder or a checkpoint file inside one."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist (expected a sharpness run folder or its checkpoint.pt)")
    run_dir, checkpoint = (path.parent, path) if path.is_file() else (path, path / CHECKPOINT_NAME)
    config_path = run_dir / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a sharpness run folder: {config_path} is missing")
    _refuse_comparison(run_dir)
    if not checkpoint.is_file():
        raise FileNotFoundError(
            f"no checkpoint at {checkpoint}: the run has not completed an epoch; "
            f"train it with: sharpness train --resume {run_dir}"
        )
    return run_dir, checkpoint


def _refuse_comparison(folder: Path) -> None:
    """A ``sharpness compare`` folder holds runs, not a model: name them (ValueError)."""
    saved = read_json(folder / CONFIG_NAME)
    if not (isinstance(saved, dict) and saved.get("kind") == "compare"):
        return
    runs = sorted(d.name for d in (folder / RUNS_DIR).iterdir() if d.is_dir()) if (folder / RUNS_DIR).is_dir() else []
    if not runs:
        raise ValueError(f"{folder} is a comparison folder without runs yet; measure one of its runs once trained")
    shown = ", ".join(runs[:8]) + (f", ... ({len(runs)} runs)" if len(runs) > 8 else "")
    example = folder / RUNS_DIR / runs[0]
    raise ValueError(
        f"{folder} is a comparison folder: measure one of its runs, e.g. sharpness measure {example} (runs: {shown})"
    )


def _load_config(run_dir: Path, device: str | None) -> RunConfig:
    """The run's settings, on ``device`` if given (checked: a CUDA device must exist here)."""
    config_path = run_dir / CONFIG_NAME
    saved = read_json(config_path)
    if not isinstance(saved, dict):
        raise ValueError(f"{config_path} does not hold a run's settings (expected a JSON object)")
    kind = saved.pop("kind", None)
    if kind == "compare":
        runs = sorted(p.name for p in (run_dir / "runs").glob("*") if (p / CONFIG_NAME).is_file())
        listed = f": {', '.join(runs)}" if runs else ""
        raise ValueError(f"{run_dir} is a comparison folder; measure one of its runs under {run_dir / 'runs'}{listed}")
    if kind != "train":
        raise ValueError(f"{config_path} has unknown kind {kind!r} (expected a 'train' run folder)")
    for key in LAUNCH_RECORD:  # how the run was launched, not a setting
        saved.pop(key, None)
    config = build_config(saved if device is None else {**saved, "device": device}, compare=False)
    assert isinstance(config, RunConfig)
    return config


def _load_model(config: RunConfig, data: Any, checkpoint: Path) -> tuple[torch.nn.Module, Callable, dict[str, Any]]:
    """The run's model (unwrapped, unsharded, on this process's device) with the checkpoint's weights, and its loss.

    The global RNG is left as it was.
    """
    state = load_checkpoint(checkpoint)
    with torch.random.fork_rng(devices=[]):  # building a model draws its initial weights
        model = build_model(config.model_name, input_shape=data.input_shape, num_classes=data.num_classes)
    model = model.to(replica_device(config.device))
    try:
        load_weights(model, state["model"])
    except ValueError as exc:
        raise ValueError(f"the weights in {checkpoint} do not fit the model of {checkpoint.parent}: {exc}") from None
    return model, loss_function(data.task), state


def _check_out(out_dir: Path, force: bool) -> None:
    """An earlier ``measure.json`` in ``out_dir`` is an error unless ``force``."""
    if (out_dir / MEASURE_NAME).exists() and not force:
        raise ValueError(
            f"{out_dir / MEASURE_NAME} already exists (an earlier measurement); pass --force to overwrite it, "
            "or --out DIR to write elsewhere"
        )


def _measurement_set(data: Any, split: str, size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = {"train": (data.x_train, data.y_train), "val": (data.x_val, data.y_val), "test": (data.x_test, data.y_test)}[
        split
    ]
    return x[:size].to(device), y[:size].to(device)


# ----------------------------------------------------------------------------- measuring


def _generator(seed: int, stream: str) -> torch.Generator:
    return torch.Generator().manual_seed(seed * _SEED_STRIDE + _STREAMS.index(stream))


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    started = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - started


def _floats(t: torch.Tensor) -> list[float]:
    return [float(v) for v in t.detach().cpu().reshape(-1)]


def _sharpness_figures(result: Any, seconds: float) -> dict[str, Any]:
    """The numbers of a rho_sharpness result dataclass (``value``, ``stderr`` and whatever else it carries)."""
    figures: dict[str, Any] = {}
    fields = [f.name for f in dataclasses.fields(result)] if dataclasses.is_dataclass(result) else []
    for key in fields:
        value = getattr(result, key)
        if isinstance(value, bool | int | float | str) or value is None:
            figures[key] = value
        elif isinstance(value, torch.Tensor) and value.numel() == 1:
            figures[key] = float(value)
        elif isinstance(value, tuple | list) and all(isinstance(v, int | float) for v in value):
            figures[key] = [float(v) for v in value]  # e.g. m-sharpness per batch
    estimates = getattr(result, "estimates", None)
    if estimates:  # m-sharpness: one estimate per batch
        figures["num_batches"] = len(estimates)
        figures["num_evaluations"] = sum(int(getattr(e, "num_evaluations", 0)) for e in estimates)
    figures["value"] = float(result.value)
    if hasattr(result, "stderr"):
        figures["stderr"] = float(result.stderr)
    figures["seconds"] = seconds
    return figures


@renamed_arguments(
    samples="trace_matvecs",
    max_iter="eig_matvecs",
    density_vectors="density_probes",
    density_steps="density_matvecs_per_probe",
    sharpness_samples="sharpness_probes",
)
def measure(
    run_dir: str | Path,
    what: str | Sequence[str] = DEFAULT_WHAT,
    *,
    measure_size: int = 1000,
    split: str = "train",
    mode: str = "eval",
    backend: str = "double_backward",
    seed: int = 0,
    top_k: int = 5,
    trace_matvecs: int = 100,
    rho: float | None = None,
    m: int = 128,
    adaptive: bool | None = None,
    params: Sequence[str] | None = None,
    eig_matvecs: int = 100,
    tol: float = 1e-6,
    density_probes: int = 10,
    density_matvecs_per_probe: int = 80,
    sharpness_steps: int = 20,
    sharpness_probes: int = 20,
    device: str | None = None,
    out: str | Path | None = None,
    force: bool = False,
    check_only: bool = False,
    processes: int | None = None,
) -> dict[str, Any]:
    """Measure the Hessian (and optionally the ρ-sharpness) of a trained run's loss; write ``measure.json``.

    Args:
        run_dir: a ``sharpness train`` run folder, or a checkpoint file inside one (its folder holds
            ``config.json``).
        what: which measurements, a comma string or a sequence of :data:`WHAT` (``"all"`` for every one).
        measure_size: the measurement set is the first ``measure_size`` examples of ``split`` (all if fewer).
        split: ``"train"`` (default: the loss that was trained on, noisy labels included), ``"val"`` or ``"test"``.
        mode: ``"eval"`` or ``"train"`` (see :func:`sharpness.curvature.measurement_mode`).
        backend: Hessian-vector products by ``"double_backward"`` or ``"forward_over_reverse"``.
        seed: seeds the estimators' generators (one per estimator).
        top_k: eigenvalues wanted (the bulk ratio λ_1/λ_5 needs 5).
        trace_matvecs: Hessian-vector products for each trace estimate (Hutch++, Hutchinson) and for the Frobenius
            norm (the trace of H²), >= 3.
        rho: sharpness radius; default the run's ``rho`` (0.05 if that is 0).
        m: m-sharpness batch size (capped at the measurement-set size).
        adaptive: adaptive (ASAM-style) sharpness; default whether the run trained with ``asam``.
        params: names or name prefixes of the parameters to measure (default all), e.g. ``["net.5"]``.
        eig_matvecs, tol: the most products (Lanczos steps) and the relative residual tolerance for ``eig``.
        density_probes, density_matvecs_per_probe: random start vectors and Lanczos steps (products) per vector
            for ``density``.
        sharpness_steps, sharpness_probes: ascent steps of the worst case, random perturbations of the average
            case.
        The old names ``samples``, ``max_iter``, ``density_vectors``, ``density_steps`` and ``sharpness_samples``
        are deprecated aliases (``measure.json`` keeps them as the keys of ``settings``).
        device: ``cpu`` or ``cuda[:N]``; default the run's device.
        out: folder for ``measure.json`` and ``spectral_density.png``; default ``RUN_DIR/measure``.
        force: overwrite the ``measure.json`` (and figure) of an earlier measurement in ``out``; without it an
            existing ``measure.json`` is an error, raised before anything is measured.
        check_only: make every check that does not need the data (the settings, the folder, its config, an earlier
            ``measure.json``) and return ``{}`` (the CLI checks this way before it starts N processes).
        processes: the number of processes the measurement runs in; default the current process group's size.

    Returns:
        The contents of ``measure.json``: ``settings``, ``loss``, ``grad_norm`` and one entry per measurement,
        ``files`` (the paths written). Non-finite numbers are ``None``.

    Raises:
        FileNotFoundError: the path is missing or not a run folder, or the checkpoint is missing.
        ValueError: a corrupt checkpoint or config, an unknown ``what`` item, a bad number or choice, an existing
            ``measure.json`` without ``force``.
    """
    names = parse_what(what)
    options = _checked_options(
        measure_size=measure_size, split=split, mode=mode, backend=backend, seed=seed, top_k=top_k,
        trace_matvecs=trace_matvecs, rho=rho, m=m, adaptive=adaptive, params=params, eig_matvecs=eig_matvecs, tol=tol,
        density_probes=density_probes, density_matvecs_per_probe=density_matvecs_per_probe,
        sharpness_steps=sharpness_steps, sharpness_probes=sharpness_probes,
    )  # fmt: skip
    rank, world_size = world()
    processes = world_size if processes is None else processes
    if processes > 1 and "sharpness" in names:
        raise ValueError(
            f"--what sharpness (ρ-sharpness) runs in one process, not in {processes}; measure it without "
            "--nproc-per-node"
        )
    run_dir, checkpoint = _locate(run_dir)
    config = _load_config(run_dir, device)
    if split == "val" and not config.val_split:
        raise ValueError("split 'val' is empty: the run has no validation split (val_split = 0)")
    out_dir = Path(out) if out is not None else run_dir / MEASURE_DIR
    if check_only:
        _check_out(out_dir, force)
        return {}
    options["rho"] = float(rho) if rho is not None else (config.rho if config.rho > 0 else 0.05)
    options["adaptive"] = config.optimizer == "asam" if adaptive is None else bool(adaptive)
    job, state = _prepare(config, checkpoint, options, world_size > 1)
    _check_out(out_dir, force)  # before anything is measured

    result: dict[str, Any] = {
        "run_dir": str(run_dir),
        "checkpoint": str(checkpoint),
        "epoch": state.get("train_state", {}).get("epoch"),
        "finished": (run_dir / FINAL_NAME).is_file(),
        "settings": _settings_record(names, options, job, world_size, config),
    }
    loss, gradient = job.op.loss_and_gradient()
    result["loss"], result["grad_norm"] = loss, float(torch.linalg.vector_norm(gradient))
    for name in names:
        result[name] = ESTIMATORS[name](job)
    result = json_safe(result, non_finite=lambda _: None)
    if rank != 0:  # rank 0 writes the files
        return {**result, "files": []}
    return _write_outputs(result, out_dir)


def _checked_options(**options: Any) -> dict[str, Any]:
    """The measurement options, each checked (ValueError naming it); ``params`` as a list or ``None``."""
    check_integer("measure_size", options["measure_size"], minimum=1)
    check_choice("split", options["split"], SPLITS)
    check_choice("mode", options["mode"], ("eval", "train"))
    check_choice("backend", options["backend"], ("double_backward", "forward_over_reverse"))
    for name, minimum in _INTEGER_MINIMA.items():
        check_integer(name, options[name], minimum=minimum)
    if options["eig_matvecs"] < options["top_k"]:
        raise ValueError(f"eig_matvecs must be >= top_k = {options['top_k']}, got {options['eig_matvecs']}")
    check_number("tol", options["tol"], low=0.0)
    if options["rho"] is not None:
        check_number("rho", options["rho"], low=0.0, low_open=True)
    params = options["params"]
    options["params"] = [params] if isinstance(params, str) else (list(params) if params else None)
    return options


_INTEGER_MINIMA = {"seed": 0, "top_k": 1, "trace_matvecs": 3, "m": 1, "eig_matvecs": 1, "density_probes": 1,
                   "density_matvecs_per_probe": 1, "sharpness_steps": 1, "sharpness_probes": 2}  # fmt: skip
#: The keys of ``settings`` in ``measure.json`` for the options renamed to the counts' vocabulary (the file keeps
#: its keys).
_RECORDED_AS = {"trace_matvecs": "samples", "eig_matvecs": "max_iter", "density_probes": "density_vectors",
                "density_matvecs_per_probe": "density_steps", "sharpness_probes": "sharpness_samples"}  # fmt: skip


@dataclasses.dataclass
class _Job:
    """What the estimators work on: the operator, the model and loss it is built from, this process's part of the
    measurement set and the checked options."""

    op: HessianOperator
    model: torch.nn.Module
    loss_fn: Callable
    x: torch.Tensor
    y: torch.Tensor
    options: dict[str, Any]
    num_examples: int


def _prepare(config: RunConfig, checkpoint: Path, options: dict[str, Any], parallel: bool) -> tuple[_Job, dict]:
    """The run's model with the checkpoint's weights, this process's shard of the measurement set and the Hessian
    operator on it (all-reduced over the process group when ``parallel``); also the checkpoint's state."""
    data = load_data(config)
    model, loss_fn, state = _load_model(config, data, checkpoint)
    x, y = _measurement_set(data, options["split"], options["measure_size"], replica_device(config.device))
    num_examples = len(y)
    rank, world_size = world()
    x, y = shard(x, y, rank, world_size)
    op = HessianOperator(
        model,
        loss_fn,
        (x, y),
        params=options["params"],
        backend=options["backend"],
        mode=options["mode"],
        process_group="default" if parallel else None,
    )
    if options["top_k"] > op.dim:
        raise ValueError(f"top_k = {options['top_k']} exceeds the number of measured parameters ({op.dim})")
    return _Job(op, model, loss_fn, x, y, options, num_examples), state


def _settings_record(
    names: list[str], options: dict[str, Any], job: _Job, processes: int, config: RunConfig
) -> dict[str, Any]:
    """The ``settings`` entry of ``measure.json``: every option as used, and what was measured."""
    options = {_RECORDED_AS.get(key, key): value for key, value in options.items()}
    return {
        "what": names,
        **{key: options[key] for key in ("split", "measure_size")},
        "num_examples": job.num_examples,
        "processes": processes,
        **{key: options[key] for key in ("mode", "backend", "seed", "top_k", "samples", "rho", "adaptive")},
        "m": min(options["m"], len(job.y)),
        "params": options["params"],
        "num_parameters": job.op.dim,
        **{key: options[key] for key in ("max_iter", "tol", "density_vectors", "density_steps")},
        **{key: options[key] for key in ("sharpness_steps", "sharpness_samples")},
        "device": config.device,
        "dataset": config.dataset,
        "model": config.model_name,
        "optimizer": config.optimizer,
    }


def _write_outputs(result: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """Write ``measure.json`` (and the density figure when measured) into ``out_dir``; the result with ``files``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = [out_dir / MEASURE_NAME]
    if "density" in result:
        figure = out_dir / DENSITY_FIGURE
        _density_figure(result, figure)
        files.append(figure)
    result["files"] = [str(path) for path in files]
    write_json(result, files[0])
    return result


# ----------------------------------------------------------------------------- the estimators


def _eig(job: _Job) -> dict[str, Any]:
    """Top eigenvalues by Lanczos, their residuals, the bulk ratio λ_1/λ_5."""
    o = job.options
    generator = _generator(o["seed"], "eig")
    eig, seconds = _timed(
        lambda: top_eigenvalues(job.op, k=o["top_k"], num_matvecs=o["eig_matvecs"], tol=o["tol"], generator=generator)
    )
    return {
        "eigenvalues": _floats(eig.eigenvalues),
        "residuals": _floats(eig.residuals),
        "converged": [bool(c) for c in eig.converged.cpu()],
        "bulk_ratio": bulk_ratio(eig.eigenvalues) if o["top_k"] >= 5 else None,
        "iterations": eig.iterations,
        "hvps": eig.num_matvecs,
        "seconds": seconds,
    }


def _trace(job: _Job) -> dict[str, Any]:
    """The trace by Hutch++ and by Hutchinson, each with ``trace_matvecs`` products."""
    traces = {}
    for key, estimate in (("hutchpp", hutchpp_trace), ("hutchinson", hutchinson_trace)):
        generator = _generator(job.options["seed"], key)
        est, seconds = _timed(
            lambda estimate=estimate, g=generator: estimate(job.op, job.options["trace_matvecs"], generator=g)
        )
        traces[key] = {
            "value": est.value,
            "stderr": est.stderr,
            "num_samples": est.num_probes,
            "hvps": est.num_matvecs,
            "seconds": seconds,
        }
    return traces


def _frobenius(job: _Job) -> dict[str, Any]:
    """``||H||_F`` (and its square) from ``trace_matvecs`` products."""
    generator = _generator(job.options["seed"], "frobenius")
    est, seconds = _timed(lambda: frobenius_norm(job.op, job.options["trace_matvecs"], generator=generator))
    return {
        "value": est.value,
        "stderr": est.stderr,
        "squared": est.squared,
        "squared_stderr": est.squared_stderr,
        "num_samples": est.num_probes,
        "hvps": est.num_matvecs,
        "seconds": seconds,
    }


def _density(job: _Job) -> dict[str, Any]:
    """The spectral density by stochastic Lanczos quadrature."""
    o = job.options
    generator = _generator(o["seed"], "density")
    dens, seconds = _timed(
        lambda: spectral_density(
            job.op,
            num_probes=o["density_probes"],
            num_matvecs_per_probe=o["density_matvecs_per_probe"],
            generator=generator,
        )
    )
    return {
        "grid": _floats(dens.grid),
        "density": _floats(dens.density),
        "nodes": [_floats(row) for row in dens.nodes],
        "weights": [_floats(row) for row in dens.weights],
        "sigma": dens.sigma,
        "num_vectors": o["density_probes"],
        "lanczos_steps": int(dens.nodes.shape[1]),
        "hvps": dens.num_matvecs,
        "seconds": seconds,
    }


def _sharpness(job: _Job) -> dict[str, Any]:
    """ρ-sharpness, worst and average case, over the whole set and per batch of ``m`` (m-sharpness)."""
    # Imported here: the module is optional for the Hessian measurements.
    from sharpness.curvature.rho_sharpness import average_case_sharpness, m_sharpness, worst_case_sharpness

    o, model, loss_fn, x, y = job.options, job.model, job.loss_fn, job.x, job.y
    rho, m, seed, steps, draws = o["rho"], min(o["m"], len(y)), o["seed"], o["sharpness_steps"], o["sharpness_probes"]
    common = {"adaptive": o["adaptive"], "params": o["params"], "mode": o["mode"]}
    runs = {
        "worst": lambda: worst_case_sharpness(
            model, loss_fn, (x, y), rho, steps=steps, generator=_generator(seed, "worst"), **common
        ),
        "average": lambda: average_case_sharpness(
            model, loss_fn, (x, y), rho, num_probes=draws, generator=_generator(seed, "average"), **common
        ),
        "m_worst": lambda: m_sharpness(
            model, loss_fn, x, y, m, rho, kind="worst", steps=steps, generator=_generator(seed, "m_worst"), **common
        ),
        "m_average": lambda: m_sharpness(
            model,
            loss_fn,
            x,
            y,
            m,
            rho,
            kind="average",
            num_probes=draws,
            generator=_generator(seed, "m_average"),
            **common,
        ),  # fmt: skip
    }
    figures: dict[str, Any] = {"rho": rho, "m": m, "adaptive": o["adaptive"], "steps": steps, "num_samples": draws}
    for key, run in runs.items():
        value, seconds = _timed(run)
        figures[key] = _sharpness_figures(value, seconds)
    return figures


ESTIMATORS: dict[str, Callable[[_Job], dict[str, Any]]] = {
    "eig": _eig,
    "trace": _trace,
    "frobenius": _frobenius,
    "density": _density,
    "sharpness": _sharpness,
}
"""The measurements :func:`measure` can make (the keys of :data:`WHAT`), each a function of the prepared job."""


# ----------------------------------------------------------------------------- output


@styled
def _density_figure(result: dict[str, Any], path: Path) -> None:
    """Log-density against eigenvalue (the SAM paper's Hessian-spectrum plots), top eigenvalues marked."""
    dens = result["density"]
    grid = torch.tensor(dens["grid"], dtype=torch.float64)
    density = torch.tensor([d or 0.0 for d in dens["density"]], dtype=torch.float64)
    peak = float(density.max()) if density.numel() else 1.0
    floor = max(peak * 1e-8, 1e-300)
    fig, ax = panels()
    ax.semilogy(grid.numpy(), density.clamp(min=floor).numpy(), color="C0", lw=1.5, label="SLQ density")
    ax.set_ylim(bottom=floor, top=peak * 3)
    eig = result.get("eig")
    if eig:
        for i, lam in enumerate(eig["eigenvalues"]):
            ax.axvline(
                lam, color="C3", lw=0.8, ls="--", alpha=0.7, label="top eigenvalues (Lanczos)" if i == 0 else None
            )
    s = result["settings"]
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density (log scale)")
    title = f"Hessian spectrum: {s['model']} on {s['dataset']}, {s['num_examples']} {s['split']} examples, {s['mode']}"
    if eig and eig.get("bulk_ratio") is not None:
        title += f"\nλ1 = {eig['eigenvalues'][0]:.4g}, λ1/λ5 = {eig['bulk_ratio']:.3g}"
    ax.set_title(title)
    ax.legend(loc="upper right")
    ax.grid(True, which="major", alpha=0.3)
    save_figure(fig, path)


def _num(value: Any) -> str:
    return "n/a" if value is None else f"{value:.6g}"


def _pm(value: Any) -> str:
    return "" if value is None else f"± {value:.3g}"


def format_measurements(result: dict[str, Any]) -> str:
    """The figures of :func:`measure` as a plain-text table (value, standard error, products, seconds)."""
    s = result["settings"]
    where = f"{s['num_examples']} {s['split']} examples, {s['mode']} mode, {s['backend']}, seed {s['seed']}"
    scope = f"{s['num_parameters']:,} parameters" + (f" ({', '.join(s['params'])})" if s["params"] else "")
    lines = [
        f"{result['checkpoint']} (epoch {result['epoch']}): {s['model']} on {s['dataset']}, {scope}",
        f"measurement set: {where}",
        "",
    ]
    rows: list[tuple[str, str, str, str, str, str]] = []

    def row(name: str, value: Any, stderr: Any = None, hvps: Any = "", seconds: Any = None, note: str = "") -> None:
        text = value if isinstance(value, str) else _num(value)
        secs = "" if seconds is None else f"{seconds:.2f}"
        rows.append((name, text, _pm(stderr), str(hvps), secs, note))

    row("loss", result["loss"], note="gradient pass")
    row("gradient norm", result["grad_norm"])
    if "eig" in result:
        eig = result["eig"]
        for i, (lam, res, ok) in enumerate(zip(eig["eigenvalues"], eig["residuals"], eig["converged"], strict=True)):
            note = f"residual {_num(res)}, {'converged' if ok else 'NOT converged'}"
            first = i == 0
            row(f"λ{i + 1}", lam, None, eig["hvps"] if first else "", eig["seconds"] if first else None, note)
        row("λ1/λ5", eig["bulk_ratio"] if eig["bulk_ratio"] is not None else "n/a (top-k < 5)")
    if "trace" in result:
        for key, label in (("hutchpp", "trace (Hutch++)"), ("hutchinson", "trace (Hutchinson)")):
            t = result["trace"][key]
            row(label, t["value"], t["stderr"], t["hvps"], t["seconds"])
    if "frobenius" in result:
        f = result["frobenius"]
        row("Frobenius norm", f["value"], f["stderr"], f["hvps"], f["seconds"])
    if "density" in result:
        d = result["density"]
        figure = next((p for p in result.get("files", []) if p.endswith(DENSITY_FIGURE)), DENSITY_FIGURE)
        note = f"{d['num_vectors']} vectors × {d['lanczos_steps']} steps, σ = {d['sigma']:.3g}; {figure}"
        row("spectral density (SLQ)", "", None, d["hvps"], d["seconds"], note)
    if "sharpness" in result:
        sh = result["sharpness"]
        kind = "adaptive " if sh["adaptive"] else ""
        labels = (
            ("worst", f"worst-case {kind}ρ-sharpness", f"{sh['steps']} ascent steps"),
            ("average", f"average-case {kind}ρ-sharpness", f"{sh['num_samples']} draws"),
            ("m_worst", f"m-sharpness (worst, m={sh['m']})", f"{sh['steps']} ascent steps per batch"),
            ("m_average", f"m-sharpness (average, m={sh['m']})", f"{sh['num_samples']} draws per batch"),
        )
        for key, label, note in labels:
            fig = sh[key]
            extra = [f"ρ = {sh['rho']:g}", note]
            if fig.get("num_batches"):
                extra.append(f"{fig['num_batches']} batches")
            if fig.get("num_evaluations"):
                extra.append(f"{fig['num_evaluations']} forward passes")
            stderr = fig.get("stderr") if key != "worst" else None  # one ascent: no sampling error
            row(label, fig["value"], stderr, "", fig["seconds"], ", ".join(extra))

    header = ("quantity", "value", "stderr", "HVPs", "seconds", "")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(5)]
    for r in [header, *rows]:
        cells = [r[0].ljust(widths[0]), r[1].rjust(widths[1]), r[2].ljust(widths[2]), r[3].rjust(widths[3])]
        cells.append(r[4].rjust(widths[4]))
        lines.append(("  ".join(cells) + ("  " + r[5] if r[5] else "")).rstrip())
    return "\n".join(lines)
