"""SAM in Hugging Face accelerate loops: examples/accelerate_sam.py's ``prepare`` and ``train`` (docs/integrations.md),
built on :func:`sharpness.integrations.accelerate.sam_step`, checked against references that do not use accelerate.

- One process: the loop equals SAM's closure API bitwise (float32 and float64; SAM, AE-SAM, LookSAM) and a
  hand-written SAM in plain autograd to 1e-12 (float64); so does the closure form through ``AcceleratedOptimizer``.
- bf16 (CPU autocast): the forward runs in bf16, the weights stay finite and follow the fp32 run.
- fp16's ``GradScaler`` path (accelerate enables fp16 only on a GPU, so a CPU scaler is put in its place): equal to
  the unscaled run bitwise; a non-finite gradient in either pass skips the step and backs off the scale. Real fp16
  runs with ``-m cuda``.
- Two processes (gloo, DDP prepared by accelerate): equal to single-process m-SAM with one micro-batch per rank
  (float64, 1e-10); one gradient all-reduce per SAM step (counted by a DDP communication hook); AE-SAM equal to
  SAM's closure API on a plain DDP module, the replicas bitwise identical.
"""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from spawned import run_spawned
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset

from sharpness import AESAM, SAM, LookSAM
from sharpness.integrations.accelerate import sam_step, unwrap_sam

_ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("accelerate_sam_example", _ROOT / "examples" / "accelerate_sam.py")
example = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(example)

BATCHES, EPOCHS, BATCH = 4, 2, 8  # batches per process and epoch
BASE = dict(lr=0.05, momentum=0.9)
PRESETS = {
    "sam": lambda net: SAM(net.parameters(), torch.optim.SGD, rho=0.05, model=net, **BASE),
    "aesam": lambda net: AESAM(net.parameters(), torch.optim.SGD, total_steps=BATCHES * EPOCHS, model=net, **BASE),
    "looksam": lambda net: LookSAM(net.parameters(), torch.optim.SGD, k=2, alpha=0.5, model=net, **BASE),
}


def make_model(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 3)).to(dtype)


def make_loader(dtype: torch.dtype, world_size: int = 1) -> DataLoader:
    """``BATCHES`` batches per process; every other batch (rank 1's under two processes) has 10x larger inputs, so
    the replicas' local gradient norms differ strongly."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(BATCHES * world_size, BATCH, 5, generator=gen, dtype=torch.float64)
    x[1::2] *= 10.0
    y = torch.randint(0, 3, (BATCHES * world_size * BATCH,), generator=gen)
    return DataLoader(TensorDataset(x.reshape(-1, 5).to(dtype), y), batch_size=BATCH, shuffle=False)


def flat(net: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in net.parameters()])


def closure_of(net: nn.Module, x: torch.Tensor, y: torch.Tensor):
    def closure() -> torch.Tensor:
        loss = nn.functional.cross_entropy(net(x), y)
        loss.backward()
        return loss

    return closure


def prepared(accelerator: Accelerator, preset: str, dtype: torch.dtype = torch.float32, world_size: int = 1):
    """The example's ``prepare`` on this module's model, optimizer and data: (model, optimizer, loader)."""
    return example.prepare(accelerator, make_model(dtype), PRESETS[preset], make_loader(dtype, world_size))


def scaled_accelerator(scale: float = 2.0**10) -> Accelerator:
    """A CPU accelerator with the ``GradScaler`` that ``Accelerator(mixed_precision="fp16")`` sets up on a GPU."""
    accelerator = Accelerator(cpu=True)
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=scale)
    return accelerator


def accelerate_run(dtype: torch.dtype, preset: str, accelerator: Accelerator | None = None):
    """The documented example in one process: prepare, then train; (model, optimizer, epoch losses)."""
    accelerator = accelerator if accelerator is not None else Accelerator(cpu=True)
    model, optimizer, loader = prepared(accelerator, preset, dtype)
    losses = example.train(accelerator, model, optimizer, loader, EPOCHS)
    return model, optimizer, losses


def closure_api_run(dtype: torch.dtype, preset: str) -> tuple[nn.Module, SAM]:
    """The reference: SAM's closure API, no accelerate."""
    net = make_model(dtype)
    opt = PRESETS[preset](net)
    for _ in range(EPOCHS):
        for x, y in make_loader(dtype):
            opt.step(closure_of(net, x, y))
    return net, opt


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """accelerate keeps process-wide singletons; each test starts (and leaves) them empty."""
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


# ----------------------------------------------------------------------------- one process


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_one_process_loop_equals_the_closure_api_bitwise(dtype: torch.dtype, preset: str) -> None:
    model, optimizer, _ = accelerate_run(dtype, preset)
    reference, ref_opt = closure_api_run(dtype, preset)
    assert torch.equal(flat(model), flat(reference))
    assert torch.equal(model[1].running_mean, reference[1].running_mean)  # the perturbed pass's BN stats dropped
    assert (unwrap_sam(optimizer).steps, unwrap_sam(optimizer).sam_steps) == (ref_opt.steps, ref_opt.sam_steps)
    if preset == "aesam":
        assert 0 < ref_opt.sam_steps < ref_opt.steps  # both kinds of step happened


def test_one_process_loop_equals_hand_written_sam() -> None:
    """Plain autograd: ε = ρ g / ||g||, the gradient at w + ε, SGD with momentum; float64, 1e-12."""
    model, _, _ = accelerate_run(torch.float64, "sam")
    net = make_model(torch.float64)
    params, momentum = list(net.parameters()), None
    for _ in range(EPOCHS):
        for x, y in make_loader(torch.float64):
            g = torch.autograd.grad(nn.functional.cross_entropy(net(x), y), params)
            scale = 0.05 / torch.cat([t.reshape(-1) for t in g]).norm()
            saved = [p.detach().clone() for p in params]
            with torch.no_grad():
                for p, gi in zip(params, g, strict=True):
                    p.add_(gi * scale)
            g = torch.autograd.grad(nn.functional.cross_entropy(net(x), y), params)
            momentum = g if momentum is None else [0.9 * m + gi for m, gi in zip(momentum, g, strict=True)]
            with torch.no_grad():
                for p, w, m in zip(params, saved, momentum, strict=True):
                    p.copy_(w - 0.05 * m)
    torch.testing.assert_close(flat(model), flat(net), rtol=0, atol=1e-12)


@pytest.mark.parametrize("preset", ["sam", "aesam"])
def test_closure_form_through_the_accelerated_optimizer(preset: str) -> None:
    """Without fp16, ``optimizer.step(closure)`` on the prepared optimizer is SAM's closure API."""
    accelerator = Accelerator(cpu=True)
    model, optimizer, loader = prepared(accelerator, preset)
    for _ in range(EPOCHS):
        for x, y in loader:

            def closure() -> torch.Tensor:
                loss = nn.functional.cross_entropy(model(x), y)
                accelerator.backward(loss)
                return loss

            optimizer.step(closure)
    assert torch.equal(flat(model), flat(closure_api_run(torch.float32, preset)[0]))


def test_bf16_runs_in_bf16_stays_finite_and_follows_fp32() -> None:
    accelerator = Accelerator(cpu=True, mixed_precision="bf16")
    model = make_model(torch.float32)
    dtypes = []
    model[0].register_forward_hook(lambda module, inputs, output: dtypes.append(output.dtype))
    model, optimizer, loader = example.prepare(accelerator, model, PRESETS["sam"], make_loader(torch.float32))
    losses = example.train(accelerator, model, optimizer, loader, EPOCHS)
    assert set(dtypes) == {torch.bfloat16}
    assert all(math.isfinite(loss) for loss in losses) and torch.isfinite(flat(model)).all()
    reference, start = flat(closure_api_run(torch.float32, "sam")[0]), flat(make_model(torch.float32))
    assert not torch.equal(flat(model), reference)  # bf16 changed the arithmetic ...
    assert (flat(model) - reference).norm() < 0.1 * (reference - start).norm()  # ... not the trajectory


@pytest.mark.parametrize("preset", ["sam", "aesam"])
def test_grad_scaler_path_equals_the_unscaled_run(preset: str) -> None:
    """Under fp16, accelerate scales the loss in ``backward`` and sam_step unscales through the scaler: with a
    power-of-two scale the run is bitwise the unscaled one (AE-SAM's decisions see the unscaled ||g||²)."""
    accelerator = scaled_accelerator()
    model, optimizer, _ = accelerate_run(torch.float32, preset, accelerator)
    reference, ref_opt = closure_api_run(torch.float32, preset)
    assert torch.equal(flat(model), flat(reference))
    assert unwrap_sam(optimizer).sam_steps == ref_opt.sam_steps
    assert accelerator.scaler.get_scale() == 2.0**10  # no step was skipped


@pytest.mark.parametrize(("preset", "poisoned_call"), [("sam", 1), ("sam", 2), ("aesam", 1)])
def test_a_non_finite_pass_skips_the_step_and_backs_off_the_scale(preset: str, poisoned_call: int) -> None:
    """A NaN loss at w (SAM: skipped first_step; AE-SAM: an ERM step refused) or at w + ε (the scaler refuses)."""
    accelerator = scaled_accelerator()
    model, optimizer, loader = prepared(accelerator, preset)
    x, y = next(iter(loader))
    calls = []

    def compute_loss() -> torch.Tensor:
        calls.append(None)
        return nn.functional.cross_entropy(model(x), y) * (math.nan if len(calls) == poisoned_call else 1.0)

    before = flat(model)
    sam_step(accelerator, model, optimizer, compute_loss)
    assert torch.equal(flat(model), before) and unwrap_sam(optimizer).steps == 0
    assert optimizer.step_was_skipped and accelerator.scaler.get_scale() == 2.0**9
    assert math.isfinite(sam_step(accelerator, model, optimizer, lambda: nn.functional.cross_entropy(model(x), y)))
    assert not optimizer.step_was_skipped and unwrap_sam(optimizer).steps == 1
    assert not torch.equal(flat(model), before)


@pytest.mark.cuda
@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="accelerate enables fp16 (autocast and GradScaler) only on a GPU; the scaler path is tested on CPU above",
)
def test_fp16_on_cuda_runs_and_follows_fp32() -> None:
    accelerator = Accelerator(mixed_precision="fp16")
    model, _, losses = accelerate_run(torch.float32, "sam", accelerator)
    assert accelerator.scaler is not None and all(math.isfinite(loss) for loss in losses)
    reference, start = flat(closure_api_run(torch.float32, "sam")[0]), flat(make_model(torch.float32))
    assert (flat(model).cpu() - reference).norm() < 0.1 * (reference - start).norm()


def test_setups_that_would_compute_something_else_are_errors() -> None:
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = make_model(torch.float32)
    with pytest.raises(ValueError, match="gradient_accumulation_steps=2 is not supported"):
        sam_step(accelerator, model, PRESETS["sam"](model), lambda: model(torch.ones(2, 5)).sum())
    with pytest.raises(TypeError, match="sam_step needs a sharpness.SAM optimizer .* got SGD"):
        sam_step(accelerator, model, torch.optim.SGD(model.parameters()), lambda: model(torch.ones(2, 5)).sum())


def test_the_example_script_trains() -> None:
    losses = example.main(["--epochs", "2"])
    assert len(losses) == 2 and losses[1] < losses[0]


def test_the_docs_show_the_tested_example() -> None:
    source = (_ROOT / "examples" / "accelerate_sam.py").read_text()
    code = source[source.index("import argparse") :]
    assert code in " ".join(path.read_text() for path in (_ROOT / "docs").glob("*.md")), (
        "a docs/*.md page must show examples/accelerate_sam.py from its imports on, verbatim"
    )


# ----------------------------------------------------------------------------- two processes


def _count_allreduces(ddp: DistributedDataParallel) -> list[int]:
    """A DDP communication hook that counts the gradient all-reduces (one per bucket and synchronised backward)."""
    calls = [0]

    def hook(state, bucket):
        calls[0] += 1
        return default_hooks.allreduce_hook(state, bucket)

    ddp.register_comm_hook(None, hook)
    return calls


def scenario_accelerate(rank: int, world_size: int) -> dict:
    """The example on ``world_size`` gloo ranks (the process group exists; accelerate reads the env and adopts it)."""
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size)
    )
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    accelerator = Accelerator(cpu=True)
    out: dict = {"num_processes": accelerator.num_processes}
    sgd = DistributedDataParallel(make_model(torch.float64))
    calls = _count_allreduces(sgd)
    nn.functional.cross_entropy(sgd(torch.ones(2, 5, dtype=torch.float64)), torch.zeros(2, dtype=torch.long)).backward()
    out["allreduces_per_backward"] = calls[0]
    for preset in ("sam", "aesam"):
        model, optimizer, loader = prepared(accelerator, preset, torch.float64, world_size)
        calls = _count_allreduces(model)
        example.train(accelerator, model, optimizer, loader, EPOCHS)
        batches = [(x.clone(), y.clone()) for x, y in loader]
        reference = DistributedDataParallel(make_model(torch.float64))  # SAM's closure API on DDP, no accelerate
        ref_opt = PRESETS[preset](reference)
        for _ in range(EPOCHS):
            for x, y in batches:
                ref_opt.step(closure_of(reference, x, y))
        sam = unwrap_sam(optimizer)
        out[preset] = {
            "state": flat(model.module),
            "closure_api_ddp": flat(reference.module),
            "batches": batches,
            "allreduces": calls[0],
            "steps": (sam.steps, sam.sam_steps),
        }
    unaware = SAM(model.parameters(), torch.optim.SGD, lr=0.1)  # built without model=: would desynchronise
    for name, (net, opt) in {"unaware": (model, unaware), "unwrapped": (model.module, optimizer)}.items():
        try:
            sam_step(accelerator, net, opt, lambda: model(batches[0][0]).sum())
        except ValueError as error:
            out[f"{name}_error"] = str(error)
    return out


@pytest.fixture(scope="module")
def ranks() -> list[dict]:
    return [rank["accelerate"] for rank in run_spawned({"accelerate": scenario_accelerate}, 2, timeout=120)]


def test_two_processes_equal_single_process_m_sam(ranks) -> None:
    assert [rank["num_processes"] for rank in ranks] == [2, 2]
    net = make_model(torch.float64)
    opt = PRESETS["sam"](net)
    for _ in range(EPOCHS):
        for shards in zip(ranks[0]["sam"]["batches"], ranks[1]["sam"]["batches"], strict=True):
            opt.step_micro_batches([closure_of(net, x, y) for x, y in shards])
    assert not torch.equal(ranks[0]["sam"]["batches"][0][0], ranks[1]["sam"]["batches"][0][0])  # sharded
    torch.testing.assert_close(ranks[0]["sam"]["state"], flat(net), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("preset", ["sam", "aesam"])
def test_two_processes_replicas_agree_with_the_closure_api_on_ddp(ranks, preset: str) -> None:
    first, second = ranks[0][preset], ranks[1][preset]
    assert torch.equal(first["state"], second["state"])
    assert torch.equal(first["state"], first["closure_api_ddp"])
    assert first["steps"] == second["steps"]
    if preset == "aesam":
        assert 0 < first["steps"][1] < first["steps"][0]  # SAM and ERM steps, decided alike on both ranks


@pytest.mark.parametrize("preset", ["sam", "aesam"])
def test_two_processes_one_gradient_allreduce_per_sam_step(ranks, preset: str) -> None:
    """The first pass runs under no_sync; an ERM step after it is averaged by SAM itself (not a DDP bucket)."""
    per_backward = ranks[0]["allreduces_per_backward"]
    steps, sam_steps = ranks[0][preset]["steps"]
    assert per_backward >= 1 and steps == BATCHES * EPOCHS
    assert ranks[0][preset]["allreduces"] == sam_steps * per_backward


def test_two_processes_sam_without_its_ddp_model_is_an_error(ranks) -> None:
    """SAM built without model=, or sam_step given the unwrapped module: either would desynchronise the replicas."""
    for rank in ranks:
        assert "model must be the DDP module SAM was built with" in rank["unaware_error"]
        assert "model must be the DDP module SAM was built with" in rank["unwrapped_error"]
