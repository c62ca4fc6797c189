"""ρ-sharpness of a model's loss on a batch: worst case, average case and m-sharpness.

Andriushchenko, Croce, Müller, Hein & Flammarion, "A modern look at the relationship between sharpness and
generalization" (ICML 2023, arXiv 2302.07011), after Foret et al. (ICLR 2021, arXiv 2010.01412) for
m-sharpness. With ``L_B`` the mean loss on a batch ``B``, ``w`` the selected parameters and a scale ``c``:

- worst case:    ``S_max = max_{||δ ⊘ c||_p ≤ ρ} L_B(w + δ) − L_B(w)``,  ``p ∈ {2, ∞}``;
- average case:  ``S_avg = E_δ [L_B(w + δ) − L_B(w)]``,  ``δ = c ⊙ z`` with ``z`` random of size ``ρ``;
- m-sharpness:   the mean of either over the disjoint batches of size ``m`` of a data set.

Scale ``c``: ``c = 1`` (plain), or ``c = |w| + η`` element-wise when ``adaptive`` (``η = eta``, ASAM's offset;
Kwon et al., ICML 2021). Every computation runs in the *scaled coordinates* ``z = δ ⊘ c``, in which the
constraint is the plain ball ``||z||_p ≤ ρ`` and ``δ = c ⊙ z``. Where ``c = 0`` (a weight exactly 0 with
``adaptive=True, eta=0``) the constraint forces ``δ = 0``: such coordinates are never perturbed, and they are
left out of the random draws (their ``z`` is kept at 0, so no part of the radius is spent on them).

Worst case, by projected gradient ascent in ``z`` (the ascent gradient is ``c ⊙ ∇L(w + δ)``):

- start at ``z = 0`` (``random_start=True``: a random point of the ball instead: on the sphere ``||z||_2 = ρ``
  for ``p = 2``, uniform in the box for ``p = ∞``; the authors' code starts at random too);
- step ``z ← Π(z + α u)`` with ``u = h / ||h||_2`` (``p = 2``) or ``u = sign(h)`` (``p = ∞``), ``h`` the ascent
  gradient, and ``Π`` the projection onto the ball (rescaling for ``p = 2``, clipping for ``p = ∞``);
- step size: ``α = step_size``, default ``2ρ`` (the authors' initial step), halved whenever a step does not
  increase the loss (the step is then undone): a simple form of the step-size reduction of their Auto-PGD
  (momentum and restarts left out). With any ``α ≥ ρ`` the first step from ``z = 0`` lands exactly on SAM's
  first-order perturbation (``ρ g/||g||``, or ``ρ sign(g)``; ASAM's for ``adaptive=True``), so ``steps=1``
  measures the SAM ascent point and more steps can only improve on it. The ascent finds a local maximum: on
  small tanh networks 20 steps came within 0.1% of the best of 300-step ascents with random restarts for
  ``p = 2`` and ``ρ ≤ 1``, but fell 35% short in one of six checks at ``ρ = 3``, and 27% short in one of twelve
  ``p = ∞`` checks (for ``p = ∞`` and a convex loss, every vertex ``v = ρ sign(∇L(w + v))`` of the box is a
  local maximum, where sign ascent stops); on a quadratic the error decays geometrically with the eigengap
  (3e-4 after 20 steps, 1e-15 after 80, for ``λ_2/λ_1 = 0.72``). Raise ``steps``, or take the best over
  ``random_start`` runs;
- where the ascent gradient is exactly zero (a stationary point, e.g. the minimiser of a quadratic), ``u`` is a
  random direction from ``generator``, so the ascent does not stall at ``z = 0``;
- the result is the best loss seen, ``δ = 0`` included: ``S_max ≥ 0`` always (it is a lower bound on the true
  maximum, exact for small problems, see the tests).

Average case: ``z = ρ ξ / √d`` with ``ξ ~ N(0, I_d)`` (``distribution="gaussian"``, so ``E||z||² = ρ²``), or
``z = ρ ξ / ||ξ||`` (``"sphere"``: uniform on the sphere ``||z||_2 = ρ``), ``d`` the number of perturbed
coordinates (those with ``c > 0``). The paper writes ``δ ~ N(0, ρ² diag(c²))`` instead (standard deviation
``ρ`` per coordinate); that is ``rho = ρ_paper · √d`` here. The mean and its standard error over
``num_probes`` random perturbations (one forward pass each; ``num_samples`` is a deprecated alias) are reported.

Every measurement runs under :func:`~sharpness.curvature.state.measurement_mode` (``mode="eval"`` by default)
and leaves the model exactly as found: the parameters are perturbed in place for the forward passes and copied
back bitwise afterwards (also when ``loss_fn`` raises), ``.grad`` is never touched (the ascent uses
``torch.autograd.grad``), modes and buffers are restored. All randomness comes from ``generator`` (a fresh
generator seeded 0 when ``None``), never the global RNG.

Warning from the paper: sharpness, however measured, often does not predict generalisation across
hyper-parameters; report it, don't overclaim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from sharpness._deprecation import renamed_arguments
from sharpness.checks import check_integer, check_real, is_real
from sharpness.curvature.linop import default_generator
from sharpness.curvature.operator import Batch, LossFn, ParamFilter, select_parameters
from sharpness.curvature.state import MODES, Mode, measurement_mode
from sharpness.optim.snapshot import TensorSnapshot

__all__ = ["SharpnessEstimate", "MSharpness", "worst_case_sharpness", "average_case_sharpness", "m_sharpness"]

DISTRIBUTIONS = ("gaussian", "sphere")
KINDS = ("worst", "average")


@dataclass(frozen=True)
class SharpnessEstimate:
    """A ρ-sharpness measurement on one batch.

    Attributes:
        value: ``perturbed_loss − loss``; for the worst case the best value found (``≥ 0``: ``δ = 0`` counts),
            for the average case the mean over the samples.
        stderr: the standard error of ``value``: ``std(samples, ddof=1)/sqrt(num_probes)`` for the average case
            (``nan`` for one sample); ``nan`` for the worst case (a deterministic lower bound, not a mean).
        loss: ``L_B(w)``, the loss of the unperturbed model.
        perturbed_loss: ``L_B(w + δ*)`` at the best iterate (worst case) or the mean perturbed loss (average).
        perturbation_norm: the scaled norm of the perturbation: ``||δ* ⊘ c||_p`` of the best iterate (worst case;
            0 when ``δ = 0`` was the best), or ``sqrt(mean ||δ ⊘ c||_2²)`` over the samples (average case).
        num_evaluations: forward passes of the model on the batch (with or without a backward pass).
        kind: ``"worst"`` or ``"average"``.
    """

    value: float
    stderr: float
    loss: float
    perturbed_loss: float
    perturbation_norm: float
    num_evaluations: int
    kind: str


@dataclass(frozen=True)
class MSharpness:
    """m-sharpness: the mean of a ρ-sharpness over the disjoint batches of size ``m``.

    Attributes:
        value: the mean of ``per_batch``.
        stderr: ``std(per_batch, ddof=1) / sqrt(num_batches)`` (``nan`` for one batch).
        per_batch: the sharpness of each batch, in data order (``n // m`` entries).
        loss: the mean unperturbed loss over the batches.
        m: the batch size.
        estimates: the full :class:`SharpnessEstimate` of each batch.
    """

    value: float
    stderr: float
    per_batch: tuple[float, ...]
    loss: float
    m: int
    estimates: tuple[SharpnessEstimate, ...]

    @property
    def num_batches(self) -> int:
        return len(self.per_batch)


# ---------------------------------------------------------------------------------------------- arguments


def _norm_order(p: object) -> float:
    if not is_real(p) or p not in (2, math.inf):
        raise ValueError(f"p must be 2 or math.inf, got {p!r}")
    return float(p)


def _mode(mode: object) -> Mode:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return mode  # type: ignore[return-value]


def _batch(batch: object) -> Batch:
    if not (isinstance(batch, tuple | list) and len(batch) == 2):
        raise ValueError("batch must be an (x, y) pair")
    return batch[0], batch[1]  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------- machinery


class _Perturbed:
    """Evaluates ``L_B(w + c ⊙ z)`` (and its gradient in ``z``) with the parameters written in place.

    Must be used inside ``measurement_mode`` and a ``try/finally`` that calls :meth:`restore`.
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, batch: Batch, params: ParamFilter, adaptive: bool, eta):
        self.model, self.loss_fn = model, loss_fn
        self.x, self.y = batch
        self.params = [p for _, p in select_parameters(model, params)]
        self.sizes = [p.numel() for p in self.params]
        with torch.no_grad():
            self.w0 = torch.cat([p.detach().reshape(-1) for p in self.params])
            self.scale = self.w0.abs().add_(eta) if adaptive else torch.ones_like(self.w0)
        self.mask = self.scale > 0
        self.active = int(self.mask.sum())  # coordinates that can move (c > 0)
        self.evaluations = 0
        self.snapshot = TensorSnapshot()
        self.snapshot.save(self.params)
        self.dirty = False  # whether the parameters hold anything but the saved values

    def restore(self) -> None:
        self.snapshot.restore()

    @torch.no_grad()
    def _write(self, z: Tensor | None) -> None:
        if z is None:  # the unperturbed weights: the snapshot itself, bitwise
            if self.dirty:
                self.snapshot.restore()
                self.snapshot.save(self.params)
                self.dirty = False
            return
        self.dirty = True
        w = torch.addcmul(self.w0, self.scale, z)
        for p, chunk in zip(self.params, w.split(self.sizes), strict=True):
            p.copy_(chunk.view_as(p))

    def loss(self, z: Tensor | None) -> float:
        self._write(z)
        self.evaluations += 1
        with torch.no_grad():
            return float(self.loss_fn(self.model(self.x), self.y))

    def loss_and_gradient(self, z: Tensor | None) -> tuple[float, Tensor]:
        """The loss at ``w + c ⊙ z`` and its gradient in ``z``, ``c ⊙ ∇L`` (``.grad`` untouched)."""
        self._write(z)
        self.evaluations += 1
        with torch.enable_grad():
            loss = self.loss_fn(self.model(self.x), self.y)
            grads = torch.autograd.grad(loss, self.params, allow_unused=True)
        flat = torch.cat(
            [(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(self.params, grads, strict=True)]
        )
        return float(loss.detach()), flat.mul_(self.scale)

    def random(self, generator: torch.Generator, uniform: bool = False) -> Tensor:
        """A standard normal (or, ``uniform``, a ``U(-1, 1)``) vector on the active coordinates (0 where ``c = 0``).

        Drawn on the generator's device in float64 for float64 weights and float32 otherwise, then moved."""
        dtype = torch.float64 if self.w0.dtype == torch.float64 else torch.float32
        draw = torch.rand if uniform else torch.randn
        xi = draw(self.w0.numel(), generator=generator, device=generator.device, dtype=dtype)
        if uniform:
            xi.mul_(2).sub_(1)
        return xi.to(self.w0.device, self.w0.dtype).mul_(self.mask)


def _check_loss(loss: float) -> float:
    if not math.isfinite(loss):
        raise ValueError(f"the loss of the unperturbed model is not finite ({loss}); sharpness is undefined")
    return loss


def _ball_norm(z: Tensor, p: float) -> float:
    return float(torch.linalg.vector_norm(z.double(), p))


def _project(z: Tensor, rho: float, p: float) -> Tensor:
    if math.isinf(p):
        return z.clamp_(-rho, rho)
    norm = _ball_norm(z, 2.0)
    return z.mul_(rho / norm) if norm > rho else z


def _direction(h: Tensor, p: float, state: _Perturbed, generator: torch.Generator) -> Tensor:
    """``h/||h||_2`` or ``sign(h)``; a random direction when ``h`` is zero or not finite."""
    norm = _ball_norm(h, 2.0)
    if not (math.isfinite(norm) and norm > 0.0):
        h = state.random(generator)
        norm = _ball_norm(h, 2.0)
    return torch.sign(h) if math.isinf(p) else h / norm


# ---------------------------------------------------------------------------------------------- public API


def worst_case_sharpness(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Batch,
    rho: float,
    *,
    p: float = 2,
    adaptive: bool = False,
    eta: float = 0.0,
    steps: int = 20,
    step_size: float | None = None,
    random_start: bool = False,
    params: ParamFilter = None,
    mode: Mode = "eval",
    generator: torch.Generator | None = None,
) -> SharpnessEstimate:
    """Worst-case ρ-sharpness ``max_{||δ ⊘ c||_p ≤ ρ} L_B(w + δ) − L_B(w)`` by projected gradient ascent.

    Args:
        model: the network; perturbed in place during the measurement and restored bitwise.
        loss_fn: ``loss_fn(outputs, targets)`` returning the MEAN loss over the batch.
        batch: ``(x, y)``.
        rho: the radius ``ρ ≥ 0`` (in the scaled coordinates ``δ ⊘ c``).
        p: ``2`` or ``math.inf``.
        adaptive: ``c = |w| + eta`` element-wise if true, else ``c = 1``.
        eta: the offset of the adaptive scale (``≥ 0``); with ``eta = 0`` weights equal to 0 are not perturbed.
        steps: projected ascent steps (``≥ 1``); each costs one forward and backward pass (the last one a forward
            pass only), plus one forward/backward pass at ``w`` (and one at the random start).
        step_size: the initial step ``α`` in the scaled coordinates (default ``2ρ``; any ``α ≥ ρ`` makes the first
            step SAM's perturbation); halved whenever a step fails to increase the loss.
        random_start: start from a random point of the ball instead of ``δ = 0``.
        params: parameter filter (:func:`~sharpness.curvature.operator.select_parameters`); the others stay fixed.
        mode: ``"eval"`` or ``"train"`` (:func:`~sharpness.curvature.state.measurement_mode`).
        generator: the source of the random start and of the random directions taken at a zero gradient.

    Returns:
        a :class:`SharpnessEstimate` (``value ≥ 0``; ``stderr = nan``).
    """
    rho = check_real(rho, "rho", low=0.0)
    p = _norm_order(p)
    eta = check_real(eta, "eta", low=0.0)
    steps = check_integer(steps, "steps", low=1)
    alpha = 2.0 * rho if step_size is None else check_real(step_size, "step_size", low=0.0, low_open=True)
    mode = _mode(mode)
    x, y = _batch(batch)
    generator = default_generator(generator)

    with measurement_mode(model, mode):
        state = _Perturbed(model, loss_fn, (x, y), params, bool(adaptive), eta)
        try:
            loss0, h = state.loss_and_gradient(None)
            _check_loss(loss0)
            z = torch.zeros_like(state.w0)
            current = best = loss0
            best_norm = 0.0
            if random_start and rho > 0 and state.active > 0:
                if math.isinf(p):
                    z = state.random(generator, uniform=True).mul_(rho)
                else:
                    xi = state.random(generator)
                    z = xi.mul_(rho / _ball_norm(xi, 2.0))
                current, h = state.loss_and_gradient(z)
                if current > best:
                    best, best_norm = current, _ball_norm(z, p)
            if rho > 0 and state.active > 0:
                for step in range(steps):
                    if not math.isfinite(current):
                        break  # an infinite loss is the maximum; a nan one cannot be ascended
                    candidate = _project(z + alpha * _direction(h, p, state, generator), rho, p)
                    last = step == steps - 1
                    if last:
                        value, h_new = state.loss(candidate), h
                    else:
                        value, h_new = state.loss_and_gradient(candidate)
                    if value > best:
                        best, best_norm = value, _ball_norm(candidate, p)
                    if value > current:
                        z, current, h = candidate, value, h_new
                    else:
                        alpha *= 0.5
        finally:
            state.restore()
    return SharpnessEstimate(
        value=best - loss0,
        stderr=math.nan,
        loss=loss0,
        perturbed_loss=best,
        perturbation_norm=best_norm,
        num_evaluations=state.evaluations,
        kind="worst",
    )


@renamed_arguments(num_samples="num_probes")
def average_case_sharpness(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Batch,
    rho: float,
    *,
    num_probes: int = 20,
    distribution: Literal["gaussian", "sphere"] = "gaussian",
    adaptive: bool = False,
    eta: float = 0.0,
    params: ParamFilter = None,
    mode: Mode = "eval",
    generator: torch.Generator | None = None,
) -> SharpnessEstimate:
    """Average-case ρ-sharpness ``E_δ [L_B(w + δ) − L_B(w)]``, ``δ = c ⊙ z``, with its standard error.

    ``z = ρ ξ/√d``, ``ξ ~ N(0, I_d)`` (``"gaussian"``: ``E||z||² = ρ²``), or ``z = ρ ξ/||ξ||`` (``"sphere"``), over
    the ``d`` coordinates with ``c > 0``. The paper's ``N(0, ρ² diag(c²))`` is ``rho = ρ_paper · √d`` here.
    ``num_probes``: the number of random perturbations ``δ`` averaged, ``>= 1`` (the standard error needs
    ``>= 2``); deprecated alias ``num_samples``. Other arguments as in :func:`worst_case_sharpness`. Costs
    ``1 + num_probes`` forward passes.
    """
    rho = check_real(rho, "rho", low=0.0)
    num_probes = check_integer(num_probes, "num_probes", low=1)
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
    eta = check_real(eta, "eta", low=0.0)
    mode = _mode(mode)
    x, y = _batch(batch)
    generator = default_generator(generator)

    with measurement_mode(model, mode):
        state = _Perturbed(model, loss_fn, (x, y), params, bool(adaptive), eta)
        try:
            loss0 = _check_loss(state.loss(None))
            losses, squared_norms = [], []
            for _ in range(num_probes):
                z = state.random(generator)
                if state.active > 0:
                    norm = math.sqrt(state.active) if distribution == "gaussian" else _ball_norm(z, 2.0)
                    z.mul_(rho / norm)
                losses.append(state.loss(z))
                squared_norms.append(_ball_norm(z, 2.0) ** 2)
        finally:
            state.restore()
    gaps = torch.tensor(losses, dtype=torch.float64) - loss0
    stderr = float(gaps.std(correction=1)) / math.sqrt(num_probes) if num_probes > 1 else math.nan
    return SharpnessEstimate(
        value=float(gaps.mean()),
        stderr=stderr,
        loss=loss0,
        perturbed_loss=float(torch.tensor(losses, dtype=torch.float64).mean()),
        perturbation_norm=math.sqrt(sum(squared_norms) / num_probes),
        num_evaluations=state.evaluations,
        kind="average",
    )


@renamed_arguments(num_samples="num_probes")  # mapped here, so the batches' calls do not warn once each
def m_sharpness(
    model: nn.Module,
    loss_fn: LossFn,
    x: Tensor,
    y: Tensor,
    m: int,
    rho: float,
    *,
    kind: Literal["worst", "average"] = "worst",
    generator: torch.Generator | None = None,
    **kwargs,
) -> MSharpness:
    """m-sharpness (Foret et al., 2021; Andriushchenko et al., 2023): the mean sharpness of disjoint batches.

    The data are cut in order into ``n // m`` batches ``(x[i m:(i+1) m], y[i m:(i+1) m])``; the last
    ``n mod m`` examples are dropped (shuffle beforehand for random batches). Each batch is measured with
    :func:`worst_case_sharpness` (``kind="worst"``) or :func:`average_case_sharpness` (``"average"``) with
    ``kwargs`` (e.g. ``steps``, ``num_probes``; the deprecated ``num_samples`` is mapped here, once); one
    ``generator`` (a fresh one seeded 0 when ``None``) is shared by the batches in turn, so ``m = n`` gives exactly
    the full-batch measurement with the same generator.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    n = len(x)
    if len(y) != n:
        raise ValueError(f"x and y hold different numbers of examples ({n} and {len(y)})")
    m = check_integer(m, "m", low=1, high=n, what=f"the batch size, at most the n = {n} examples")
    rho = check_real(rho, "rho", low=0.0)
    generator = default_generator(generator)
    measure = worst_case_sharpness if kind == "worst" else average_case_sharpness
    estimates = tuple(
        measure(model, loss_fn, (x[i * m : (i + 1) * m], y[i * m : (i + 1) * m]), rho, generator=generator, **kwargs)
        for i in range(n // m)
    )
    values = torch.tensor([e.value for e in estimates], dtype=torch.float64)
    stderr = float(values.std(correction=1)) / math.sqrt(len(values)) if len(values) > 1 else math.nan
    return MSharpness(
        value=float(values.mean()),
        stderr=stderr,
        per_batch=tuple(float(v) for v in values),
        loss=sum(e.loss for e in estimates) / len(estimates),
        m=m,
        estimates=estimates,
    )
