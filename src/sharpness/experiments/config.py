"""Run configurations: one training run, and a comparison of optimizers over seeds.

The field names are the CLI flags with ``-`` replaced by ``_`` (``--label-noise`` ↔ ``label_noise``), and the keys
of a ``--config`` TOML file (either spelling). Every value is checked by :meth:`RunConfig.validate` before any
data is loaded or any model is trained.
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from sharpness import checks
from sharpness.data import DATASETS
from sharpness.models import NORMALISED_MODELS, has_normalisation, parse_model_name
from sharpness.optim.registry import OPTIMIZERS, RHO_OPTIMIZERS, SAM_FAMILY

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

DEFAULT_MODELS = {
    "mnist1d": "cnn1d",
    "digits": "cnn",
    "cifar10": "resnet18",
    "cifar100": "resnet18",
    "synthetic": "mlp",
}
SCHEDULES = ("cosine", "constant")
MICRO_BATCH_OPTIMIZERS = ("sam", "asam")
"""The optimizers that take ``micro_batch``: m-sharpness steps are SAM steps, never ERM steps."""


class ConfigError(ValueError):
    """An invalid configuration value; the message names the setting, the value and what is allowed."""


@dataclass
class RunConfig:
    """One training run (``sharpness train``)."""

    dataset: str = "mnist1d"
    model: str | None = None  # None: the dataset's default (DEFAULT_MODELS)
    optimizer: str = "sgd"
    rho: float = 0.05
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 64
    epochs: int = 60
    seed: int = 0
    schedule: Literal["cosine", "constant"] = "cosine"
    label_noise: float = 0.0
    val_split: float = 0.0
    augment: bool | None = None  # None: the dataset's default (on for CIFAR)
    data_dir: str | None = None
    device: str = "cpu"
    threads: int | None = None  # torch.set_num_threads; None leaves torch's default
    checkpoint_every: int = 1
    # options of the efficient SAM variants (see sharpness.optim.registry.build_optimizer)
    k: int | None = None  # periodicsam / looksam: SAM every k steps (defaults 2 / 5)
    sam_prob: float = 0.5  # randomsam: probability of a SAM step
    alpha: float = 0.3  # looksam / aelooksam: weight of the reused g_v (the paper's 0.7 collapses training here)
    delta: float = 0.9  # aesam / aelooksam: EMA factor
    lambda1: float = -1.0  # aesam / aelooksam: threshold c_t at the end of training
    lambda2: float = 1.0  # aesam / aelooksam: threshold c_t at the start
    track_sharpness_every: int | None = None  # measure λ_max, ||g|| and the stability edge every N steps
    micro_batch: int | None = None  # sam / asam: m of m-sharpness (each micro-batch of m gets its own ε)
    sam_start: float = 0.8  # latesam / lateaesam: fraction of the steps taken by SGD before SAM starts
    perturb: str = "all"  # SAM family: parameters ε moves: all, norm (normalisation layers) or comma name prefixes
    fsdp: bool = False  # with several processes: shard the model with FSDP2 instead of replicating it (DDP)

    @property
    def model_name(self) -> str:
        return self.model or DEFAULT_MODELS[self.dataset]

    def validate(self) -> RunConfig:
        """Check every value; raise :class:`ConfigError` naming the first bad one. Returns ``self``."""
        check_choice("dataset", self.dataset, DATASETS)
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_choice("schedule", self.schedule, SCHEDULES)
        try:
            parse_model_name(self.model_name)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        check_integer("epochs", self.epochs, minimum=1)
        check_integer("batch_size", self.batch_size, minimum=1)
        check_integer("seed", self.seed, minimum=0)
        check_integer("checkpoint_every", self.checkpoint_every, minimum=1)
        if self.threads is not None:
            check_integer("threads", self.threads, minimum=1)
        check_number("lr", self.lr, low=0.0, low_open=True)
        check_number("rho", self.rho, low=0.0)
        check_number("momentum", self.momentum, low=0.0, high=1.0, high_open=True)
        check_number("weight_decay", self.weight_decay, low=0.0)
        check_number("label_noise", self.label_noise, low=0.0, high=1.0, high_open=True)
        check_number("val_split", self.val_split, low=0.0, high=1.0, high_open=True)
        if self.k is not None:
            check_integer("k", self.k, minimum=1)
        if self.track_sharpness_every is not None:
            check_integer("track_sharpness_every", self.track_sharpness_every, minimum=1)
        checks.check_bool(self.fsdp, "fsdp", error=ConfigError)
        if self.fsdp and self.track_sharpness_every is not None:
            raise ConfigError(
                "track_sharpness_every (--track-sharpness-every) cannot measure a model sharded by FSDP (--fsdp); "
                "train without it and measure the run afterwards with: sharpness measure RUN_DIR"
            )
        if self.micro_batch is not None:
            check_integer("micro_batch", self.micro_batch, minimum=1)
            if self.optimizer not in MICRO_BATCH_OPTIMIZERS:
                raise ConfigError(
                    f"micro_batch (m-sharpness) applies to {' and '.join(MICRO_BATCH_OPTIMIZERS)}, whose every step "
                    f"is a SAM step; optimizer {self.optimizer!r} does not take it"
                )
        check_number("sam_prob", self.sam_prob, low=0.0, high=1.0)
        check_number("alpha", self.alpha, low=0.0)
        check_number("delta", self.delta, low=0.0, high=1.0, high_open=True)
        check_number("lambda1", self.lambda1, low=-math.inf)
        check_number("lambda2", self.lambda2, low=-math.inf)
        check_number("sam_start", self.sam_start, low=0.0, high=1.0)
        self._check_perturb()
        if self.dataset.startswith("cifar") and not self.data_dir:
            raise ConfigError(
                f"dataset {self.dataset!r} is read from a local folder: pass --data-dir DIR (the folder with the "
                "python-pickle batches, e.g. cifar-10-batches-py)"
            )
        _check_device(self.device)
        return self

    def _check_perturb(self) -> None:
        """``perturb``: ``all``, ``norm`` (a model with normalisation layers) or name prefixes, for the SAM family."""
        if not isinstance(self.perturb, str) or not self.perturb.strip():
            raise ConfigError(
                f"perturb must be 'all', 'norm' or comma-separated parameter-name prefixes, got {self.perturb!r}"
            )
        if self.perturb == "all":
            return
        if self.optimizer not in SAM_FAMILY:
            raise ConfigError(
                f"perturb={self.perturb!r} restricts SAM's perturbation; optimizer {self.optimizer!r} has none: use "
                f"one of {', '.join(SAM_FAMILY)}, or perturb='all'"
            )
        if self.perturb == "norm" and not has_normalisation(self.model_name):
            raise ConfigError(
                f"perturb='norm' perturbs normalisation layers, but model {self.model_name!r} has none; use a model "
                f"with them ({', '.join(NORMALISED_MODELS)}; e.g. --model cnn1d-bn for mnist1d)"
            )


@dataclass
class CompareConfig:
    """Several optimizers over several seeds (``sharpness compare``)."""

    run: RunConfig = field(default_factory=RunConfig)
    optimizers: list[str] = field(default_factory=lambda: ["sgd", "sam"])
    seeds: int = 3
    first_seed: int = 0  # the runs use seeds first_seed, ..., first_seed + seeds - 1
    rho_grid: list[float] | None = None  # select rho on validation for the SAM-family optimizers
    equal_compute: bool = False  # optimizers with one pass per step get twice the epochs
    optimizer_settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Run settings for one optimizer's runs only, e.g. ``{"msam": {"rho": 0.3}}`` (in a TOML config:
    ``[optimizer_settings.msam]`` then ``rho = 0.3``)."""

    def validate(self) -> CompareConfig:
        self.run.validate()
        if not self.optimizers:
            raise ConfigError("optimizers must name at least one optimizer")
        for name in self.optimizers:
            check_choice("optimizers", name, OPTIMIZERS)
        if len(set(self.optimizers)) != len(self.optimizers):
            raise ConfigError(f"optimizers must not repeat a name, got {self.optimizers}")
        check_integer("seeds", self.seeds, minimum=1)
        check_integer("first_seed", self.first_seed, minimum=0)
        if self.rho_grid is not None:
            if not self.rho_grid:
                raise ConfigError("rho_grid is empty; give at least one value, e.g. --rho-grid 0.05,0.1")
            for rho in self.rho_grid:
                check_number("rho_grid value", rho, low=0.0)
            if self.run.val_split <= 0:
                raise ConfigError("--rho-grid selects rho on a validation split: also pass --val-split (e.g. 0.1)")
            if not any(name in RHO_OPTIMIZERS for name in self.optimizers):
                raise ConfigError(f"--rho-grid needs an optimizer with a rho ({', '.join(RHO_OPTIMIZERS)}) to tune")
        self._check_optimizer_settings()
        return self

    def _check_optimizer_settings(self) -> None:
        if not isinstance(self.optimizer_settings, dict):
            raise ConfigError("optimizer_settings must map optimizer names to settings, e.g. {'msam': {'rho': 0.3}}")
        for name, settings in self.optimizer_settings.items():
            if name not in self.optimizers:
                raise ConfigError(
                    f"optimizer_settings names {name!r}, which is not among the optimizers {self.optimizers}"
                )
            if not isinstance(settings, dict):
                raise ConfigError(f"optimizer_settings[{name!r}] must be a table of run settings, got {settings!r}")
            fixed = sorted(set(settings) & {"optimizer", "seed", "epochs"})
            unknown = sorted(set(settings) - RUN_FIELDS)
            if fixed or unknown:
                raise ConfigError(
                    f"optimizer_settings[{name!r}] cannot set {fixed + unknown}: a comparison fixes optimizer, seed "
                    f"and epochs per run, and other keys must be run settings ({', '.join(sorted(RUN_FIELDS))})"
                )
            if "rho" in settings and self.rho_grid and name in RHO_OPTIMIZERS:
                raise ConfigError(f"optimizer_settings[{name!r}] sets rho, which --rho-grid tunes; give one of them")
            self.run_for(name).validate()

    def run_for(self, optimizer: str, **fields: Any) -> RunConfig:
        """The run settings of ``optimizer``'s runs: the common ones, its :attr:`optimizer_settings`, its epochs
        (:meth:`epochs_for`) and ``fields``."""
        settings = self.optimizer_settings.get(optimizer, {})
        return dataclasses.replace(
            self.run, **{**settings, "optimizer": optimizer, "epochs": self.epochs_for(optimizer), **fields}
        )

    def epochs_for(self, optimizer: str) -> int:
        """SAM-family runs cost two passes per step: with ``equal_compute`` the others get twice the epochs."""
        return self.run.epochs * (2 if self.equal_compute and optimizer not in SAM_FAMILY else 1)


def _check_device(device: Any) -> None:
    """ConfigError unless ``device`` is ``cpu`` or ``cuda[:N]`` naming a CUDA device that torch sees here.

    Checked with the other settings, so ``--device cuda`` on a machine without CUDA fails before anything is created.
    """
    if not isinstance(device, str) or not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise ConfigError(f"device must be 'cpu' or 'cuda[:N]', got {device!r}")
    if device != "cpu":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if int(device.partition(":")[2] or 0) >= count:
            raise ConfigError(
                f"device {device!r} is not available here (torch sees {count} CUDA device(s)); pass --device cpu"
            )


# ----------------------------------------------------------------------------- building from flags / TOML

RUN_FIELDS = {f.name for f in dataclasses.fields(RunConfig)}
COMPARE_FIELDS = {f.name for f in dataclasses.fields(CompareConfig)} - {"run"}


def read_toml(path: str | Path) -> dict[str, Any]:
    """The key/value pairs of a ``--config`` file, keys normalised to underscores."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            raw = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    return {key.replace("-", "_"): value for key, value in raw.items()}


def build_config(values: dict[str, Any], *, compare: bool) -> RunConfig | CompareConfig:
    """A validated config from ``values`` (flags and/or TOML keys); unknown keys are an error."""
    allowed = RUN_FIELDS | (COMPARE_FIELDS if compare else set())
    unknown = sorted(set(values) - allowed)
    if unknown:
        raise ConfigError(f"unknown setting(s) {unknown}; valid: {', '.join(sorted(allowed))}")
    run = RunConfig(**{key: value for key, value in values.items() if key in RUN_FIELDS})
    if not compare:
        return run.validate()
    extra = {key: value for key, value in values.items() if key in COMPARE_FIELDS}
    return CompareConfig(run=run, **extra).validate()


# ----------------------------------------------------------------------------- checks


# Thin uses of sharpness.checks that raise ConfigError (the CLI turns it into exit status 2).


def check_choice(name: str, value: Any, valid: tuple[str, ...]) -> None:
    """ConfigError unless ``value`` is one of ``valid``."""
    checks.check_choice(value, name, valid, error=ConfigError)


def check_integer(name: str, value: Any, *, minimum: int) -> None:
    """ConfigError unless ``value`` is an integer (not a bool) ``>= minimum``."""
    checks.check_integer(value, name, low=minimum, error=ConfigError)


def check_number(
    name: str,
    value: Any,
    *,
    low: float,
    high: float = math.inf,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """ConfigError unless ``value`` is a finite number between ``low`` and ``high`` (open or closed ends)."""
    checks.check_real(value, name, low=low, high=high, low_open=low_open, high_open=high_open, error=ConfigError)


__all__ = [
    "CompareConfig",
    "ConfigError",
    "DEFAULT_MODELS",
    "RunConfig",
    "build_config",
    "read_toml",
]
