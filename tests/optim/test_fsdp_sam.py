"""SAM on FSDP2 (``fully_shard``, DTensor parameters): 2 spawned ranks (gloo, CPU, float64), each fed its half of
every batch, equal single-process SAM on the whole batch to 1e-10, for SAM (p = 2 and ∞), ASAM, AE-SAM, LookSAM,
AE-LookSAM and MSAM (each against the same optimizer in one process)."""

from __future__ import annotations

import pytest
import torch
from fsdp_runs import PRESETS, full_parameters, model, spawn, train


@pytest.fixture(scope="module")
def ranks() -> list[dict]:
    return spawn(world_size=2)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_sharded_sam_equals_single_process_sam(ranks, preset: str) -> None:
    net = model()
    opt = PRESETS[preset](net.parameters())
    train(net, opt, rank=0, world_size=1)
    for rank in ranks:
        torch.testing.assert_close(rank["presets"][preset]["params"], full_parameters(net), rtol=1e-10, atol=1e-10)
        assert rank["presets"][preset]["steps"] == (opt.steps, getattr(opt, "sam_steps", None))
    assert not torch.equal(full_parameters(net), full_parameters(model()))


def test_a_partly_sharded_model_is_a_clear_error(ranks) -> None:
    assert all("shard the whole model" in rank["errors"]["partly_sharded"] for rank in ranks)


@pytest.mark.parametrize("preset", ["sam", "aesam", "looksam"])
def test_resuming_from_torch_distributed_checkpoint_continues_bit_identically(ranks, preset: str) -> None:
    for rank in ranks:
        result = rank["dcp_resume"][preset]
        assert result["restored"] == result["expected"] and result["expected"][0] == 3
        assert result["equal"]
