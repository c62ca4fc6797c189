"""Live sharpness tracking: λ_max of the training loss's Hessian against the optimizer's stability edge.

Every ``every`` optimizer steps the :class:`SharpnessTracker` callback measures, on a fixed measurement set (by
default the first ``measure_size`` training examples), the top Hessian eigenvalue λ_max by Lanczos warm-started
from the previous top eigenvector (so tracking costs a few Hessian-vector products per measurement), the gradient
norm ``||g||`` and the edge that applies to the optimizer (:func:`~sharpness.curvature.optimizer_edges.optimizer_edge`:
``2/η`` for GD, ``(2 + 2β)/η`` for heavy-ball momentum, the SAM-edge ``ηλ(1 + ρλ/||g||) = 2 + 2β`` for SAM, ...;
Cohen et al. 2021; Long & Bartlett 2024). For Adam, AdamW and RMSprop (also inside SAM or MSAM) it also measures
the preconditioned sharpness ``λ_max(P⁻¹H)`` with ``P`` from the optimizer's state
(:mod:`sharpness.curvature.preconditioned`), warm-started the same way: that is the quantity whose edge
(``38/η`` for Adam at β₁ = 0.9) applies (Cohen et al., arXiv 2207.14484). Each measurement is a row of
``sharpness.jsonl`` in the run folder; the latest values also go into the epoch's metrics.

In a data-parallel run (DDP, several processes) every process runs the tracker on its contiguous part of the
measurement set and the Hessian-vector products are all-reduced (``HessianOperator(process_group="default")``), so
the measurement is that of one process on the whole set; give ``run_dir`` on rank 0 only. Not with a model sharded
by FSDP2 (its Hessian-vector products would need double backward through the sharded forward): measure the run's
checkpoint afterwards with ``sharpness measure``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from sharpness._deprecation import renamed_arguments, renamed_attribute
from sharpness.checks import check_integer
from sharpness.curvature.eigen import EigenResult, top_eigenvalues
from sharpness.curvature.operator import HessianOperator
from sharpness.curvature.optimizer_edges import StabilityEdge, optimizer_edge
from sharpness.curvature.preconditioned import PreconditionedOperator, adaptive_preconditioner
from sharpness.curvature.state import Mode
from sharpness.data import num_batches
from sharpness.optim.msam import unperturbed_weights
from sharpness.optim.policy import Always
from sharpness.optim.sam import SAM
from sharpness.train.callbacks import Callback
from sharpness.train.checkpoint import to_json
from sharpness.train.distributed import shard

if TYPE_CHECKING:
    from sharpness.train.loop import StepOutput, Trainer

TRACKING_NAME = "sharpness.jsonl"


class SharpnessTracker(Callback):
    """Measure λ_max, ``||g||`` and the stability edge every ``every`` steps (and after the last step).

    A row of ``sharpness.jsonl`` has ``step``, ``epoch``, ``loss``, ``lambda_max`` (always the raw ``λ_max(H)``),
    ``grad_norm``, ``edge``, ``edge_kind`` (the vocabulary of :mod:`sharpness.curvature.optimizer_edges`: ``"gd"``,
    ``"momentum"``, ``"adam"``, ``"sam+momentum"``, ``"asam+momentum (bound)"``, ...), ``lambda_over_edge``
    (the sharpness the edge is about over the edge: ``preconditioned_lambda_max`` for Adam/AdamW/RMSprop bases,
    ``lambda_max`` otherwise; 0 when the edge is ∞ at ``lr = 0``, null when it is unknown), ``residual`` and
    ``matvecs`` (Hessian-vector products of the measurement, both eigenvalues). With an adaptive optimizer also
    ``preconditioned_lambda_max`` and ``preconditioned_residual``.

    Switching policies (AE-SAM, LookSAM, RandomSAM, periodic SAM, LateSAM: a SAM step on some steps, a plain base
    step on the others) alternate two dynamics with two edges. The row reports both, ``sam_step_edge`` and
    ``erm_step_edge``, and ``sam_fraction``, the fraction of SAM steps among the steps since the previous
    measurement; ``edge`` and ``edge_kind`` are those of the step type the majority of those steps took (SAM on a
    tie, or when no step was taken). The edge of the alternating dynamic itself lies between the two (e.g. SAM every
    ``k`` steps around GD: the ``λ`` with ``|1 − ηλ(1 + ρλ/||g||)| · |1 − ηλ|^{k−1} = 1``); it is not computed.

    Args:
        every: steps between measurements (>= 1).
        run_dir: if given, each measurement is appended to ``run_dir/sharpness.jsonl`` (rewritten from the saved
            rows when a run resumes).
        measure_size: the measurement set is the first ``measure_size`` training examples (fixed for the run).
        tol, num_matvecs: Lanczos tolerance (relative residual) and the most Hessian-vector products per
            eigenvalue (deprecated alias: ``max_iter``).
        mode: ``"eval"`` or ``"train"`` Hessian (see :func:`sharpness.curvature.state.measurement_mode`).
    """

    max_iter = renamed_attribute("max_iter", "num_matvecs")

    @renamed_arguments(max_iter="num_matvecs")
    def __init__(
        self,
        every: int,
        *,
        run_dir: str | Path | None = None,
        measure_size: int = 512,
        tol: float = 1e-3,
        num_matvecs: int = 30,
        mode: Mode = "eval",
    ) -> None:
        self.every = check_integer(every, "every", owner="SharpnessTracker", low=1)
        self.measure_size = check_integer(measure_size, "measure_size", owner="SharpnessTracker", low=1)
        self.tol, self.num_matvecs, self.mode = tol, num_matvecs, mode
        self.path = Path(run_dir) / TRACKING_NAME if run_dir is not None else None
        self.rows: list[dict[str, Any]] = []
        self._vector: torch.Tensor | None = None  # warm starts: the last top eigenvector of H ...
        self._preconditioned_vector: torch.Tensor | None = None  # ... and of P^{-1/2} H P^{-1/2}
        self._counts = (0, 0)  # the optimizer's (steps, SAM steps) at the last measurement

    def on_train_start(self, trainer: Trainer) -> None:
        if trainer.sharded:
            raise ValueError(
                "SharpnessTracker does not measure a model sharded by FSDP2; train without it and measure the "
                "checkpoint afterwards (sharpness measure RUN_DIR)"
            )
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text("".join(to_json(row) + "\n" for row in self.rows))

    def on_step_end(self, trainer: Trainer, step: StepOutput) -> None:
        last_step = step.step == trainer.epochs * _steps_per_epoch(trainer)
        if step.step % self.every == 0 or last_step:
            self.measure(trainer, step.step, step.epoch)

    def measure(self, trainer: Trainer, step: int, epoch: int) -> dict[str, Any]:
        """One measurement now, at the unperturbed weights (:func:`~sharpness.optim.msam.unperturbed_weights`:
        MSAM keeps the parameters perturbed between steps); returns (and records) its row."""
        data = trainer.data
        n = min(self.measure_size, len(data.y_train))
        x, y = shard(data.x_train[:n], data.y_train[:n], trainer.rank, trainer.world_size)
        group = "default" if trainer.world_size > 1 else None
        with unperturbed_weights(trainer.optimizer):
            op = HessianOperator(
                trainer.model,
                trainer.loss_fn,
                (x.to(trainer.device), y.to(trainer.device)),
                mode=self.mode,
                process_group=group,
            )
            loss, gradient = op.loss_and_gradient()
            grad_norm = float(gradient.norm())
            result = self._top(op, self._vector)
            preconditioner = adaptive_preconditioner(trainer.optimizer, op.params)
            preconditioned = (
                None
                if preconditioner is None
                else self._top(PreconditionedOperator(op, preconditioner), self._preconditioned_vector)
            )
        self._vector = result.eigenvectors[0].detach()
        row = {"step": step, "epoch": epoch + 1, "loss": loss, "lambda_max": float(result.eigenvalues[0])}
        edge, switching = self._edges(trainer, grad_norm)
        row.update(grad_norm=grad_norm, edge=edge.value, edge_kind=edge.kind, **switching)
        row.update(residual=float(result.residuals[0]), matvecs=result.num_matvecs)
        sharpness = row["lambda_max"]
        if preconditioned is not None:
            self._preconditioned_vector = preconditioned.eigenvectors[0].detach()
            row["preconditioned_lambda_max"] = float(preconditioned.eigenvalues[0])
            row["preconditioned_residual"] = float(preconditioned.residuals[0])
            row["matvecs"] += preconditioned.num_matvecs
        if edge.preconditioned:  # NaN (null) if the optimizer has not stepped yet: no preconditioner
            sharpness = row.get("preconditioned_lambda_max", math.nan)
        row["lambda_over_edge"] = sharpness / edge.value  # 0 where the edge is infinite (lr = 0)
        self.rows.append(row)
        if self.path is not None:
            with self.path.open("a") as handle:
                handle.write(to_json(row) + "\n")  # strict JSON: an infinite edge (lr = 0) is null
        return row

    def _top(self, op: HessianOperator | PreconditionedOperator, init: torch.Tensor | None) -> EigenResult:
        return top_eigenvalues(op, k=1, tol=self.tol, num_matvecs=self.num_matvecs, init=init)

    def _edges(self, trainer: Trainer, grad_norm: float) -> tuple[StabilityEdge, dict[str, float]]:
        """The edge to report and, for a switching policy, the fields of both step types (see the class)."""
        opt = trainer.optimizer
        sam = optimizer_edge(opt, grad_norm, micro_batches=_micro_batches(trainer))
        if not isinstance(opt, SAM) or isinstance(opt.policy, Always):
            return sam, {}
        erm = optimizer_edge(opt, grad_norm, sam_step=False)
        steps, sam_steps = opt.steps - self._counts[0], opt.sam_steps - self._counts[1]
        self._counts = (opt.steps, opt.sam_steps)
        chosen = sam if steps == 0 or 2 * sam_steps >= steps else erm
        fraction = sam_steps / steps if steps else math.nan
        return chosen, {"sam_fraction": fraction, "sam_step_edge": sam.value, "erm_step_edge": erm.value}

    def on_epoch_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        if self.rows:
            latest = self.rows[-1]
            keys = ("lambda_max", "grad_norm", "edge", "preconditioned_lambda_max")
            record.update({f"sharpness_{k}": latest[k] for k in keys if k in latest})

    def state_dict(self) -> dict[str, Any]:
        return {
            "rows": list(self.rows),
            "vector": self._vector,
            "preconditioned_vector": self._preconditioned_vector,
            "counts": self._counts,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rows, self._vector = list(state["rows"]), state["vector"]
        self._preconditioned_vector = state.get("preconditioned_vector")  # absent in older checkpoints
        self._counts = tuple(state.get("counts", (0, 0)))


def _micro_batches(trainer: Trainer) -> bool:
    """Whether SAM perturbs per part of the batch: m-sharpness (``micro_batch``), or each replica with its own
    gradient under DDP (``epsilon_from="replica"``, as :mod:`sharpness.integrations.accelerate` reads it)."""
    sync = getattr(trainer.optimizer, "_sync", None)
    return trainer.micro_batch is not None or (sync is not None and sync.local_first_pass)


def _steps_per_epoch(trainer: Trainer) -> int:
    return num_batches(len(trainer.data.y_train), trainer.batch_size)
