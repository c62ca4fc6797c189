"""SAM's per-group settings: their own ``sam_`` namespace in the parameter groups it shares with the base optimizer.

``SAM`` and its base optimizer hold the *same* group dicts (a scheduler or a user editing either edits both), so
SAM's settings must not collide with the base's: ``torch.optim.Adadelta`` has its own ``rho``, other optimizers
may have ``p``, ``eta`` or ``adaptive``. SAM therefore stores

    sam_rho, sam_p, sam_eta, sam_adaptive, sam_adaptive_scope, sam_include_weight_decay, sam_perturb

while the constructor keeps the names users know (``SAM(params, base, rho=0.05, adaptive=False, p=2, ...)``). A
group that lacks a key (e.g. added with ``opt.base_optimizer.add_param_group``) gets SAM's default for it.
``sam_perturb=False`` keeps a group out of ε (and out of its norm); :func:`sharpness.optim.perturb_subset` builds
such groups.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sharpness.checks import check_bool, check_choice, check_real

SAM_OPTIONS = ("rho", "p", "eta", "adaptive", "adaptive_scope", "include_weight_decay", "perturb")
"""The constructor's names of SAM's per-group settings; the group key of ``name`` is ``"sam_" + name``."""
ADAPTIVE_SCOPES = ("weights", "all")


def group_key(name: str) -> str:
    """The parameter-group key of SAM's setting ``name`` (``"rho"`` → ``"sam_rho"``)."""
    return "sam_" + name


def check_group(group: Mapping[str, Any]) -> dict[str, Any]:
    """Validate one group's SAM settings, naming the bad value and the fix; returns them as Python values."""
    return {
        "sam_rho": check_real(group["sam_rho"], "rho", owner="SAM", low=0.0, what="the perturbation radius"),
        "sam_p": check_real(
            group["sam_p"], "p", owner="SAM", low=1.0, allow_inf=True, what="the norm of the perturbation ball"
        ),
        "sam_eta": check_real(group["sam_eta"], "eta", owner="SAM", low=0.0, what="ASAM's T_w = |w| + eta"),
        "sam_adaptive": check_bool(group["sam_adaptive"], "adaptive", owner="SAM"),
        "sam_adaptive_scope": check_choice(group["sam_adaptive_scope"], "adaptive_scope", ADAPTIVE_SCOPES, owner="SAM"),
        "sam_include_weight_decay": check_bool(group["sam_include_weight_decay"], "include_weight_decay", owner="SAM"),
        "sam_perturb": check_bool(group["sam_perturb"], "perturb", owner="SAM"),
    }


def fill_group(group: dict[str, Any], defaults: Mapping[str, Any]) -> None:
    """Give ``group`` SAM's defaults for the keys it lacks, then validate it (values stored as Python types)."""
    for key, value in defaults.items():
        group.setdefault(key, value)
    group.update(check_group(group))


def reject_bare_options(group: Mapping[str, Any], base_defaults: Mapping[str, Any], base_name: str) -> None:
    """A group key such as ``"rho"`` that the base optimizer does not know was meant for SAM: say its new name."""
    for name in SAM_OPTIONS:
        if name in group and name not in base_defaults:
            raise ValueError(
                f"SAM: parameter group option {name!r} is not an option of {base_name}; SAM's per-group settings "
                f"are named with a 'sam_' prefix: use {group_key(name)!r}"
            )


def upgrade_group(group: dict[str, Any], base_defaults: Mapping[str, Any]) -> dict[str, Any]:
    """A group saved by format 1 (bare ``rho``, ``p``, ...) with SAM's keys renamed; the base's own keys stay."""
    group = dict(group)
    for name in SAM_OPTIONS:
        if name in group and group_key(name) not in group and name not in base_defaults:
            group[group_key(name)] = group.pop(name)
    return group


def common_p(groups: list[dict[str, Any]]) -> float:
    """The ``p`` shared by every group (the norm of the perturbation is global)."""
    ps = {float(group["sam_p"]) for group in groups}
    if len(ps) > 1:
        raise ValueError(f"SAM: all parameter groups must use the same p, got {sorted(ps)}")
    return ps.pop() if ps else 2.0


def defaults_of(**options: Any) -> dict[str, Any]:
    """SAM's defaults dict (group keys) from the constructor's options, validated."""
    return check_group({group_key(name): options[name] for name in SAM_OPTIONS})
