r"""Perturbing a subset of the parameters: parameter groups with SAM's ``sam_perturb`` key.

SAM-ON (Mueller, Vlaar, Rolnick, Hein, "Normalization Layers Are All That Sharpness-Aware Minimization Needs",
NeurIPS 2023, arXiv 2306.04226) perturbs only the affine parameters of the normalisation layers: with ``S`` the
perturbed set and ``g_S`` the gradient restricted to it,

    ε_S = ρ g_S / ||g_S||_2,      ε_j = 0 for j ∉ S,

and the base optimizer steps *every* parameter with the gradient at ``w + ε``. Verified against the official code
(github.com/mueller-mp/SAM-ON, ``sam_on.py``, ``SAM_ON.ascent_step``): the norm is taken over the perturbed
parameters only, the others are neither moved nor restored, and ``optimizer.step()`` updates all of them. Two
differences: the official code selects normalisation layers by *name* (``"norm"`` or ``"bn"`` in the parameter
name) and divides by ``||g_S|| + 1e-16``; here they are found by module *type* and a zero ``g_S`` gives ``ε = 0``.
Its ASAM variant (``ASAM_ON``, ``T_w = |w| + η`` on parameters named ``weight``, on biases too with
``--normalize_bias``, the README's recommended setting) is ``SAM(..., adaptive=True, adaptive_scope="all")`` on the
norm subset; with ``adaptive_scope="weights"`` (ndim ≥ 2) no 1-D normalisation parameter is rescaled.

:func:`perturb_subset` returns parameter groups for :class:`~sharpness.optim.SAM` or any preset: the perturbed
parameters keep the default ``sam_perturb=True``, the others get ``sam_perturb=False``. Because the choice lives in
the groups, it round-trips through ``state_dict`` and works with every policy and reuse rule, with DDP (each
replica forms the same subset) and with FSDP2 (``||g_S||`` is reduced over the ranks' shards, as the full norm is).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from torch import Tensor, nn

from sharpness.models import NORMALISED_MODELS

NORM_LAYERS: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm1d/2d/3d, SyncBatchNorm, InstanceNorm1d/2d/3d (with affine=True)
    nn.LayerNorm,
    nn.GroupNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),  # torch >= 2.4
)
"""The module types whose (affine) parameters ``"norm"`` selects; subclasses count (FSDP2's wrapped classes too)."""


def perturb_subset(
    model: nn.Module, perturb: str | Sequence[str] = "all", groups: Iterable[dict[str, Any]] | None = None
) -> list[dict[str, Any]]:
    """Parameter groups in which only the parameters ``perturb`` names are perturbed (``sam_perturb``).

    Args:
        model: the model (a ``DistributedDataParallel`` wrapper is looked through: names are the inner module's).
        perturb: ``"all"`` (every parameter, plain SAM); ``"norm"``: the parameters of normalisation layers, found
            by module type (:data:`NORM_LAYERS`), not by name; or parameter-name prefixes, a sequence or a comma
            string (``"features.1,head"``): a prefix selects the parameter of that name and those under it
            (``"head"`` selects ``head.weight`` and ``head.bias``, not ``header.weight``).
        groups: parameter groups (dicts with ``"params"`` and any options) to split; default one group of all of
            ``model``'s parameters. Each becomes a group of its selected parameters and one of the others (with
            ``"sam_perturb": False``), each keeping the group's options; empty parts are left out.

    Returns a list for ``SAM(groups, base, ...)`` or any preset. Raises a one-line ``ValueError`` for a prefix that
    matches no parameter (naming the model's top-level modules) or ``"norm"`` on a model without normalisation
    layers (naming the built-in models that have them).

    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2))
    >>> groups = perturb_subset(model, "norm")
    >>> [(len(group["params"]), group.get("sam_perturb", True)) for group in groups]
    [(2, True), (4, False)]
    """
    model = getattr(model, "module", model) if isinstance(model, nn.parallel.DistributedDataParallel) else model
    groups = [{"params": list(model.parameters())}] if groups is None else [dict(group) for group in groups]
    if perturb == "all":
        return groups
    selected = {id(param) for param in _selection(model, perturb)}
    return [part for group in groups for part in _split(group, selected) if part["params"]]


def _selection(model: nn.Module, perturb: str | Sequence[str]) -> list[Tensor]:
    if perturb == "norm":
        params = [p for module in model.modules() if isinstance(module, NORM_LAYERS) for p in module.parameters(False)]
        if not params:
            raise ValueError(
                f"perturb='norm': {type(model).__name__} has no normalisation layer with affine parameters "
                f"(BatchNorm, LayerNorm, GroupNorm, ...); built-in models with one: {', '.join(NORMALISED_MODELS)}"
            )
        return params
    prefixes = parse_prefixes(perturb)
    named = list(model.named_parameters())
    unknown = [prefix for prefix in prefixes if not any(_under(name, prefix) for name, _ in named)]
    if unknown:
        top = sorted({name.split(".")[0] for name, _ in named})
        raise ValueError(
            f"perturb: no parameter of {type(model).__name__} is named or under {', '.join(map(repr, unknown))}; give "
            f"'all', 'norm' or dotted parameter-name prefixes starting with one of: {', '.join(top)}"
        )
    return [param for name, param in named if any(_under(name, prefix) for prefix in prefixes)]


def parse_prefixes(perturb: str | Sequence[str]) -> list[str]:
    """The prefixes of a comma string or a sequence of strings; a one-line error when there is none."""
    items = perturb.split(",") if isinstance(perturb, str) else list(perturb)
    if not all(isinstance(item, str) for item in items):
        raise ValueError(f"perturb must be 'all', 'norm' or parameter-name prefixes (strings), got {perturb!r}")
    prefixes = [item.strip() for item in items if item.strip()]
    if not prefixes:
        raise ValueError(f"perturb must be 'all', 'norm' or parameter-name prefixes, got {perturb!r}")
    return prefixes


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _split(group: dict[str, Any], selected: set[int]) -> list[dict[str, Any]]:
    params = [group["params"]] if isinstance(group["params"], Tensor) else list(group["params"])
    inside = [param for param in params if id(param) in selected]
    outside = [param for param in params if id(param) not in selected]
    return [{**group, "params": inside}, {**group, "params": outside, "sam_perturb": False}]
