r"""SAM's ascent step as a composition of four small transformations (after optax's ``contrib/_sam.py``).

SAM (Foret et al., ICLR 2021, arXiv 2010.01412, eq. 2) perturbs the weights by the first-order maximiser of the
loss over a ball of radius ρ. Written as a pipeline over the gradient ``g``, the step every preset takes is

    1. :class:`Gradient`       h = s·g + λ w            (s = -1 for a group with ``maximize=True``; λ w only with
                                                        ``include_weight_decay``, the JAX implementation's choice)
    2. :class:`ASAMScaling`    h ← T_w h,  T_w = |w| + η (ASAM, Kwon et al., ICML 2021, arXiv 2102.11600; only the
                                                        tensors its ``scope`` selects, ``T = 1`` elsewhere)
    3. :class:`DualNormMap`    d = sign(h) |h|^{q-1} / ||h||_q^{q-1}   (the maximiser of <h, d> over ||d||_p ≤ 1,
                                                        1/p + 1/q = 1; p = 2: d = h/||h||_2)
    4. :class:`ParameterSubset`  ε = ρ T_w d on the selected parameters, 0 elsewhere; ``||h||`` in step 3 is taken
                                 over the selected parameters only (SAM-ON, Mueller et al., NeurIPS 2023)

A :class:`Perturbation` holds one of each (``scaling=None``: no ASAM); :func:`chain` builds one from the stages a
user names, in optax's style, with defaults for the others. :class:`~sharpness.optim.SAM` takes it as
``perturbation=``; its flags ``adaptive``, ``eta``, ``adaptive_scope``, ``p`` and ``include_weight_decay`` are the
familiar shorthand for the same object (:meth:`Perturbation.from_flags`). The settings are stored in the parameter
groups under their ``sam_`` keys (:mod:`sharpness.optim.groups`: one place, checkpointed, overridable per group), and
each step reads a group's stages back with :meth:`Perturbation.from_group`, so the arithmetic below is the only
implementation of each stage.

>>> from sharpness.optim import ascent
>>> ascent.chain(ascent.ASAMScaling(eta=0.0, scope="all"), ascent.DualNormMap(p=2.0)) == ascent.Perturbation.from_flags(
...     adaptive=True, eta=0.0, adaptive_scope="all")
True
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn

from sharpness.checks import check_bool, check_choice, check_real
from sharpness.optim.groups import ADAPTIVE_SCOPES
from sharpness.optim.perturbation import dual_norm, unit_ascent
from sharpness.optim.sharding import ShardReduce

if TYPE_CHECKING:
    from sharpness.optim.buckets import Bucket

Scope = Literal["weights", "all"]


@dataclass(frozen=True)
class Gradient:
    """Stage 1: the vector ``h = s·g + λ w`` whose first-order gain the ascent maximises.

    ``s = -1`` for a group whose base optimizer has ``maximize=True`` (the objective is ``-L``); ``λ`` is the group's
    ``weight_decay`` when ``include_weight_decay`` (weight decay as part of the loss, as in the JAX implementation),
    else 0 (the PyTorch implementations; the base optimizer applies its weight decay either way).
    """

    include_weight_decay: bool = False

    def __post_init__(self) -> None:
        check_bool(self.include_weight_decay, "include_weight_decay", owner="Gradient")

    def weight_decay(self, group: Mapping[str, Any]) -> float:
        """The ``λ`` of ``group`` that enters ``h``."""
        return group.get("weight_decay", 0.0) if self.include_weight_decay else 0.0

    def is_identity(self, group: Mapping[str, Any]) -> bool:
        """Whether ``h = g`` in ``group`` (no sign flip, no weight decay)."""
        return not (group.get("maximize", False) or self.weight_decay(group))

    def apply(
        self, group: Mapping[str, Any], params: list[Tensor], grads: list[Tensor], loss_scale: float, divisor: float
    ) -> list[Tensor]:
        """``(s g + λ w) / d`` for one bucket of ``group``; the gradients themselves (no copy) when that is ``g``.

        ``λ w`` is multiplied by ``loss_scale`` so that it is added to ``g`` on the gradients' (fp16) scale; ``d``
        rescales an ``h`` whose norm overflowed (the ascent is homogeneous of degree 0 in ``h``).
        """
        sign = -1.0 if group.get("maximize", False) else 1.0
        weight_decay = self.weight_decay(group)
        h, copied = grads, sign != 1.0 or divisor != 1.0
        if copied:
            h = torch._foreach_mul(h, sign / divisor)
        if weight_decay:
            alpha = weight_decay * loss_scale / divisor
            if copied:
                torch._foreach_add_(h, params, alpha=alpha)
            else:
                h = torch._foreach_add(h, params, alpha=alpha)
        return list(h)


@dataclass(frozen=True)
class ASAMScaling:
    """Stage 2: ASAM's change of coordinates ``T_w = |w| + η`` (element-wise), applied to ``h`` and again to ``d``.

    The ball is taken in the coordinates ``T_w^{-1} ε``, so ``ε̂ = ρ T_w d(T_w h)``; for ``p = 2``,
    ``ε̂ = ρ T_w² g / ||T_w g||``. ``scope="weights"`` (the official ASAM code's behaviour, taken here as tensors with
    ``ndim >= 2``) rescales weight tensors only, ``T = 1`` on biases and 1-D normalisation parameters; ``"all"``
    rescales every tensor (davda54/sam's ``adaptive=True`` is ``ASAMScaling(eta=0.0, scope="all")``).
    """

    eta: float = 0.01
    scope: Scope = "weights"

    def __post_init__(self) -> None:
        what = "ASAM's T_w = |w| + eta"
        object.__setattr__(self, "eta", check_real(self.eta, "eta", owner="ASAMScaling", low=0.0, what=what))
        check_choice(self.scope, "scope", ADAPTIVE_SCOPES, owner="ASAMScaling")

    def rescales(self, param: Tensor) -> bool:
        """Whether ``param`` is in the scope (its coordinates are rescaled by ``T_w``)."""
        return self.scope == "all" or param.ndim >= 2

    def scale(self, params: list[Tensor]) -> list[Tensor]:
        """``T_w = |w| + η`` for each tensor."""
        scale = torch._foreach_abs(params)
        torch._foreach_add_(scale, self.eta)
        return list(scale)


@dataclass(frozen=True)
class DualNormMap:
    """Stage 3: the unit ascent direction ``d = argmax_{||d||_p ≤ 1} <h, d> = sign(h) |h|^{q-1} / ||h||_q^{q-1}``.

    ``1/p + 1/q = 1``; ``p = 2``: ``h/||h||_2``; ``p = ∞``: ``sign(h)``; ``p = 1``: all mass on ``argmax |h_j|``
    (ties share it). The gain is ``max <h, d> = ||h||_q`` (:meth:`norm`). Numerics (no over- or underflow, norms
    accumulated in float32 or wider, reduced over FSDP2 shards) are :mod:`sharpness.optim.perturbation`'s.
    """

    p: float = 2.0

    def __post_init__(self) -> None:
        what = "the norm of the perturbation ball"
        object.__setattr__(self, "p", check_real(self.p, "p", owner="DualNormMap", low=1.0, allow_inf=True, what=what))

    def norm(self, hs: Sequence[list[Tensor]], reduce: ShardReduce | None = None) -> float:
        """``||h||_q`` over all buckets (inf/NaN when ``h`` is not finite)."""
        return dual_norm(hs, self.p, reduce)

    def direction(
        self, hs: Sequence[list[Tensor]], h_norm: float, reduce: ShardReduce | None = None
    ) -> tuple[list[list[Tensor]], float]:
        """``d`` as ``(directions, coefficient)``, ``d = coefficient · directions`` (``h_norm`` = :meth:`norm`)."""
        return unit_ascent(hs, self.p, h_norm, reduce)


@dataclass(frozen=True)
class ParameterSubset:
    """Stage 4: which parameters ε moves: ``"all"``, ``"norm"`` (normalisation layers' affine parameters, found by
    module type) or parameter-name prefixes (SAM-ON, Mueller et al., NeurIPS 2023, arXiv 2306.04226).

    The others keep ``ε = 0``, are left out of ``||h||``, and are still stepped by the base optimizer with their
    gradient at ``w + ε``. Selecting by layer or name needs the model: give SAM ``model=``; it then splits its
    parameter groups with :func:`sharpness.optim.perturb_subset` (groups with ``sam_perturb=False``).
    """

    perturb: str | tuple[str, ...] = "all"

    def __post_init__(self) -> None:
        from sharpness.optim.subset import parse_prefixes  # subset imports the model registry: load it on use

        if self.perturb not in ("all", "norm"):
            object.__setattr__(self, "perturb", tuple(parse_prefixes(self.perturb)))

    def split(self, model: nn.Module | None, groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """``groups`` split into the perturbed groups and groups with ``sam_perturb=False``."""
        if self.perturb == "all":
            return groups
        if model is None:
            raise ValueError(
                f"SAM: ParameterSubset({self.perturb!r}) selects parameters by layer or name and needs the model: "
                "pass model=... to SAM (or build the groups with sharpness.optim.perturb_subset)"
            )
        from sharpness.optim.subset import perturb_subset

        return perturb_subset(model, self.perturb, groups)


Stage = Gradient | ASAMScaling | DualNormMap | ParameterSubset


@dataclass(frozen=True)
class Perturbation:
    """SAM's ascent step: ``ε = ρ · T_w · d(T_w (s g + λ w))`` on a parameter subset (the module docstring).

    The default is plain SAM (Foret et al.): ``ε = ρ g/||g||_2`` on every parameter.
    """

    gradient: Gradient = field(default_factory=Gradient)
    scaling: ASAMScaling | None = None
    dual_norm_map: DualNormMap = field(default_factory=DualNormMap)
    subset: ParameterSubset = field(default_factory=ParameterSubset)

    @classmethod
    def from_flags(
        cls,
        adaptive: bool = False,
        *,
        p: float = 2.0,
        eta: float = 0.01,
        adaptive_scope: Scope = "weights",
        include_weight_decay: bool = False,
    ) -> Perturbation:
        """The composition that SAM's flags of the same names stand for."""
        scaling = ASAMScaling(eta, adaptive_scope) if check_bool(adaptive, "adaptive", owner="SAM") else None
        return cls(Gradient(include_weight_decay), scaling, DualNormMap(p))

    def flags(self) -> dict[str, Any]:
        """The inverse of :meth:`from_flags`: SAM's constructor flags for this composition (the subset aside)."""
        scaling = self.scaling if self.scaling is not None else ASAMScaling()
        return {
            "adaptive": self.scaling is not None,
            "p": self.dual_norm_map.p,
            "eta": scaling.eta,
            "adaptive_scope": scaling.scope,
            "include_weight_decay": self.gradient.include_weight_decay,
        }

    @classmethod
    def from_group(cls, group: Mapping[str, Any]) -> Perturbation:
        """The stages that a parameter group's ``sam_`` keys describe (its subset is the group's ``sam_perturb``)."""
        return cls.from_flags(
            group["sam_adaptive"],
            p=group["sam_p"],
            eta=group["sam_eta"],
            adaptive_scope=group["sam_adaptive_scope"],
            include_weight_decay=group["sam_include_weight_decay"],
        )


def chain(*stages: Stage) -> Perturbation:
    """A :class:`Perturbation` of the given stages, each at most once, in any order; the defaults for the others.

    >>> chain(DualNormMap(p=float("inf")))  # doctest: +NORMALIZE_WHITESPACE
    Perturbation(gradient=Gradient(include_weight_decay=False), scaling=None, dual_norm_map=DualNormMap(p=inf),
                 subset=ParameterSubset(perturb='all'))
    """
    slots = {Gradient: "gradient", ASAMScaling: "scaling", DualNormMap: "dual_norm_map", ParameterSubset: "subset"}
    chosen: dict[str, Stage] = {}
    for stage in stages:
        slot = slots.get(type(stage))
        if slot is None:
            names = ", ".join(kind.__name__ for kind in slots)
            raise TypeError(f"chain: {stage!r} is not a stage of SAM's ascent; the stages are {names}")
        if slot in chosen:
            raise ValueError(f"chain: two {type(stage).__name__} stages given; give each stage at most once")
        chosen[slot] = stage
    return Perturbation(**chosen)  # type: ignore[arg-type]


def ascent_input(bucket: Bucket, loss_scale: float, divisor: float) -> list[Tensor]:
    """Stages 1–2 on one bucket of a perturbed group: ``h = T_w (s g + λ w) / d``.

    For a rescaled bucket ``T_w`` is kept on it (``bucket.scale``) for :func:`move`.
    """
    stages = Perturbation.from_group(bucket.group)
    h = stages.gradient.apply(bucket.group, bucket.params, bucket.grads, loss_scale, divisor)
    if bucket.scaled:
        assert stages.scaling is not None  # a bucket is scaled only where the group has ASAM's stage
        bucket.scale = stages.scaling.scale(bucket.params)
        h = torch._foreach_mul(h, bucket.scale)
    return list(h)


def is_plain_gradient(bucket: Bucket) -> bool:
    """Whether :func:`ascent_input` is the bucket's gradient itself (no sign, weight decay or ASAM scaling)."""
    return not bucket.scaled and Gradient(bucket.group["sam_include_weight_decay"]).is_identity(bucket.group)


def move(bucket: Bucket, direction: list[Tensor], coefficient: float) -> None:
    """Stage 4 on one perturbed bucket: ``w += ρ · T_w · coefficient · direction`` (``T_w`` applied after
    normalising, so that the intermediate ``T_w² g`` cannot overflow)."""
    rho = bucket.group["sam_rho"]
    if bucket.scale is None:
        torch._foreach_add_(bucket.params, direction, alpha=rho * coefficient)
        return
    unit = torch._foreach_mul(direction, coefficient)
    torch._foreach_mul_(unit, bucket.scale)
    torch._foreach_add_(bucket.params, unit, alpha=rho)


def flags_of(perturbation: Perturbation | None, flags: dict[str, Any]) -> dict[str, Any]:
    """SAM's flags for the ascent it was given: ``flags`` themselves, or ``perturbation``'s when flags are at their
    defaults (a one-line ``TypeError`` when both were given)."""
    if perturbation is None:
        return flags
    if not isinstance(perturbation, Perturbation):
        raise TypeError(
            "SAM: perturbation must be a sharpness.optim.ascent.Perturbation (e.g. ascent.chain(...)), "
            f"got {type(perturbation).__name__}"
        )
    defaults = Perturbation().flags()
    changed = [name for name, value in flags.items() if value != defaults[name]]
    if changed:
        named = ", ".join(name + "=" for name in changed)
        raise TypeError(
            f"SAM: the ascent was given twice, as perturbation= and as {named}; put every "
            "setting in the Perturbation (or use the flags alone)"
        )
    return perturbation.flags()
