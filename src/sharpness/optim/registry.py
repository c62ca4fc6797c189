"""Build an optimizer by name: what the CLI and the experiments use.

Every name builds on SGD with momentum (the base of the SAM paper's experiments) unless it says otherwise:

- ``sgd``: ``torch.optim.SGD``;
- ``adam``: ``torch.optim.AdamW`` (decoupled weight decay);
- ``sam``: :class:`~sharpness.optim.SAM` around SGD (Foret et al., 2021);
- ``asam``: :class:`~sharpness.optim.SAM` with ``adaptive=True`` around SGD (Kwon et al., 2021);
- ``periodicsam``, ``randomsam``, ``looksam``, ``aesam``, ``aelooksam``: the presets of
  :mod:`sharpness.optim.presets` around SGD;
- ``latesam``: :func:`~sharpness.optim.presets.LateSAM`, SGD for the first ``sam_start`` of the steps, then SAM
  (Zhou et al., ICLR 2025); ``lateaesam``: the same with AE-SAM's adaptive policy in the late phase;
- ``msam``: :class:`~sharpness.optim.msam.MSAM` around SGD (Becker et al., 2024), one pass per step, ρ warmed up
  linearly over the first :data:`MSAM_RHO_WARMUP` of the steps.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.optim import Optimizer

from sharpness.optim.msam import MSAM
from sharpness.optim.policy import Adaptive
from sharpness.optim.presets import AESAM, AELookSAM, LateSAM, LookSAM, PeriodicSAM, RandomSAM
from sharpness.optim.sam import SAM
from sharpness.optim.subset import perturb_subset

SAM_FAMILY = ("sam", "asam", "periodicsam", "randomsam", "looksam", "aesam", "aelooksam", "latesam", "lateaesam")
"""Names whose steps may take a second (perturbed) pass; they take ``rho``."""
RHO_OPTIMIZERS = (*SAM_FAMILY, "msam")
"""Names that take ``rho`` (tuned by ``--rho-grid``): the SAM family and MSAM, whose steps take one pass."""
OPTIMIZERS = ("sgd", "adam", *RHO_OPTIMIZERS)
MSAM_RHO_WARMUP = 0.1
"""``msam``'s ρ warm-up: this fraction of the run's steps (the Trainer gives the total)."""
PRESET_DEFAULT_K = {"periodicsam": 2, "looksam": 5}
"""SAM every k steps when ``k`` is not given."""


def build_optimizer(
    name: str,
    model: nn.Module,
    *,
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    rho: float = 0.05,
    k: int | None = None,
    sam_prob: float = 0.5,
    alpha: float = 0.7,
    delta: float = 0.9,
    lambda1: float = -1.0,
    lambda2: float = 1.0,
    seed: int = 0,
    sam_start: float = 0.8,
    perturb: str | Sequence[str] = "all",
) -> Optimizer:
    """The optimizer ``name`` (one of :data:`OPTIMIZERS`) over all of ``model``'s parameters.

    SAM-family optimizers get ``model`` so that BatchNorm statistics stay out of their perturbed pass. Their
    options: ``k`` (periodicsam, looksam: SAM every k steps; defaults 2 and 5), ``sam_prob`` (randomsam),
    ``alpha`` (looksam, aelooksam: LookSAM's reuse weight), ``delta``, ``lambda1``, ``lambda2`` (aesam,
    aelooksam, lateaesam), ``seed`` (randomsam's draws), ``sam_start`` (latesam, lateaesam: the fraction of the
    steps before SAM starts). Adaptive and late policies get their ``total_steps`` from the training loop.
    ``perturb`` (every SAM-family name): which parameters ε moves, ``"all"``, ``"norm"`` or name prefixes
    (:func:`~sharpness.optim.subset.perturb_subset`; SAM-ON). ``asam`` with ``"norm"`` rescales every perturbed
    tensor (``adaptive_scope="all"``, the official ASAM-ON's choice); otherwise only tensors with ``ndim >= 2``.
    """
    key = name.lower()
    if key not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; valid names: {', '.join(OPTIMIZERS)}")
    if not lr > 0:
        raise ValueError(f"the learning rate must be > 0, got {lr}")
    if key == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    if key == "adam":
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    if key == "msam":
        msam_options = dict(lr=lr, momentum=momentum, weight_decay=weight_decay)
        return MSAM(model.parameters(), "sgd", rho, rho_warmup=MSAM_RHO_WARMUP, **msam_options)
    sgd = torch.optim.SGD
    common = dict(model=model, lr=lr, momentum=momentum, weight_decay=weight_decay)
    params = perturb_subset(model, perturb)
    adaptive = dict(delta=delta, lambda1=lambda1, lambda2=lambda2)
    if key == "sam":
        return SAM(params, sgd, rho, **common)
    if key == "asam":  # on normalisation layers (1-D tensors) ASAM rescales every tensor, as ASAM-ON does
        scope = "all" if perturb == "norm" else "weights"
        return SAM(params, sgd, rho, adaptive=True, adaptive_scope=scope, **common)
    if key == "periodicsam":
        return PeriodicSAM(params, sgd, rho, k=k or PRESET_DEFAULT_K[key], **common)
    if key == "randomsam":
        return RandomSAM(params, sgd, rho, prob=sam_prob, seed=seed, **common)
    if key == "looksam":
        return LookSAM(params, sgd, rho, k=k or PRESET_DEFAULT_K[key], alpha=alpha, **common)
    if key == "aesam":
        return AESAM(params, sgd, rho, **adaptive, **common)
    if key == "latesam":
        return LateSAM(params, sgd, rho, start=sam_start, **common)
    if key == "lateaesam":
        return LateSAM(params, sgd, rho, start=sam_start, then=Adaptive(**adaptive), **common)
    return AELookSAM(params, sgd, rho, alpha=alpha, **adaptive, **common)
