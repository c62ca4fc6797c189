"""Live sharpness tracking: λ_max of the training loss's Hessian against the applicable stability edge.

Every ``every`` optimizer steps the :class:`SharpnessTracker` callback measures, on a fixed measurement set (by
default the first ``measure_size`` training examples), the top Hessian eigenvalue λ_max by Lanczos warm-started
from the previous top eigenvector (so tracking costs a few Hessian-vector products per measurement), the gradient
norm ``||g||`` and the edge that applies to the optimizer: ``2/η`` for SGD/GD, the SAM-edge
``ηλ(1 + ρλ/||g||) = 2`` for SAM-family optimizers (Cohen et al. 2021; Long & Bartlett 2024). Each measurement is
a row of ``sharpness.jsonl`` in the run folder; the latest values also go into the epoch's metrics.

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

from sharpness.checks import check_integer
from sharpness.curvature.edges import gd_edge, sam_edge
from sharpness.curvature.eigen import top_eigenvalues
from sharpness.curvature.operator import HessianOperator
from sharpness.curvature.state import Mode
from sharpness.data import num_batches
from sharpness.optim.msam import unperturbed_weights
from sharpness.optim.sam import SAM
from sharpness.train.callbacks import Callback
from sharpness.train.checkpoint import to_json
from sharpness.train.distributed import shard

if TYPE_CHECKING:
    from sharpness.train.loop import StepOutput, Trainer

TRACKING_NAME = "sharpness.jsonl"


class SharpnessTracker(Callback):
    """Measure λ_max, ``||g||`` and the stability edge every ``every`` steps (and after the last step).

    Args:
        every: steps between measurements (>= 1).
        run_dir: if given, each measurement is appended to ``run_dir/sharpness.jsonl`` (rewritten from the saved
            rows when a run resumes).
        measure_size: the measurement set is the first ``measure_size`` training examples (fixed for the run).
        tol, max_iter: Lanczos tolerance (relative residual) and iteration cap per measurement.
        mode: ``"eval"`` or ``"train"`` Hessian (see :func:`sharpness.curvature.state.measurement_mode`).
    """

    def __init__(
        self,
        every: int,
        *,
        run_dir: str | Path | None = None,
        measure_size: int = 512,
        tol: float = 1e-3,
        max_iter: int = 30,
        mode: Mode = "eval",
    ) -> None:
        self.every = check_integer(every, "every", owner="SharpnessTracker", low=1)
        self.measure_size = check_integer(measure_size, "measure_size", owner="SharpnessTracker", low=1)
        self.tol, self.max_iter, self.mode = tol, max_iter, mode
        self.path = Path(run_dir) / TRACKING_NAME if run_dir is not None else None
        self.rows: list[dict[str, Any]] = []
        self._vector: torch.Tensor | None = None

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
            result = top_eigenvalues(op, k=1, tol=self.tol, max_iter=self.max_iter, init=self._vector)
        self._vector = result.eigenvectors[0].detach()
        lam = float(result.eigenvalues[0])
        edge, kind = self._edge(trainer, grad_norm)
        row = {
            "step": step,
            "epoch": epoch + 1,
            "loss": loss,
            "lambda_max": lam,
            "grad_norm": grad_norm,
            "edge": edge,
            "edge_kind": kind,
            "lambda_over_edge": lam / edge,  # 0 where the edge is infinite (lr = 0)
            "residual": float(result.residuals[0]),
            "matvecs": result.num_matvecs,
        }
        self.rows.append(row)
        if self.path is not None:
            with self.path.open("a") as handle:
                handle.write(to_json(row) + "\n")  # strict JSON: an infinite edge (lr = 0) is null
        return row

    @staticmethod
    def _edge(trainer: Trainer, grad_norm: float) -> tuple[float, str]:
        group = trainer.optimizer.param_groups[0]
        lr = group["lr"]
        kind = "sam" if isinstance(trainer.optimizer, SAM) and group["sam_rho"] > 0 else "gd"
        if lr == 0:  # e.g. the end of a cosine schedule: a zero step is stable at any curvature
            return math.inf, kind
        if kind == "sam" and grad_norm > 0:
            return sam_edge(lr, group["sam_rho"], grad_norm), "sam"
        return gd_edge(lr), "gd"

    def on_epoch_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        if self.rows:
            latest = self.rows[-1]
            record.update({f"sharpness_{k}": latest[k] for k in ("lambda_max", "grad_norm", "edge")})

    def state_dict(self) -> dict[str, Any]:
        return {"rows": list(self.rows), "vector": self._vector}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rows, self._vector = list(state["rows"]), state["vector"]


def _steps_per_epoch(trainer: Trainer) -> int:
    return num_batches(len(trainer.data.y_train), trainer.batch_size)
