"""The SAM family under DistributedDataParallel: 2 spawned processes (gloo, CPU) against single-process runs.

- 2-rank DDP SAM equals single-process m-SAM (``step_micro_batches``, one micro-batch per rank), float64, 1e-10;
- the replicas stay bitwise identical for every preset, and AE-SAM's decisions agree although the replicas' local
  gradient norms differ tenfold; LookSAM's ``g_v`` is identical on every replica;
- the documented two-step loop gives the closure form's result;
- a non-finite gradient on one replica skips the step on all of them (no hang);
- a run saved and loaded through ``torch.distributed.checkpoint`` continues bitwise, for every preset;
- gradient all-reduces per step, counted by a DDP communication hook: a SAM step makes as many as an SGD step,
  ``epsilon_from="global"`` twice as many, an ERM step of a switching policy as many as an SGD step;
- MSAM (SGD and AdamW bases) on 2 ranks equals single-process MSAM on the whole batches, at w̃ and at w.
"""

from __future__ import annotations

import pytest
import torch
from ddp_runs import PRESETS, batches, closure_of, flat_state, model, msam_of, plain_model, shard, spawn


@pytest.fixture(scope="module")
def ranks() -> list[dict]:
    return spawn(world_size=2)


def test_ddp_sam_equals_single_process_m_sam(ranks) -> None:
    net = model()
    opt = PRESETS["sam"](net.parameters())
    for batch in batches(2):
        opt.step_micro_batches([closure_of(net, *shard(batch, r, 2)) for r in range(2)])
    torch.testing.assert_close(ranks[0]["presets"]["sam"]["state"], flat_state(net), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_replicas_stay_bitwise_identical(ranks, preset: str) -> None:
    first, second = ranks[0]["presets"][preset], ranks[1]["presets"][preset]
    assert torch.equal(first["state"], second["state"])
    assert [d for d, _ in first["decisions"]] == [d for d, _ in second["decisions"]]
    assert all(torch.equal(a, b) for a, b in zip(first["g_v"], second["g_v"], strict=True))
    assert not torch.equal(first["state"], flat_state(model()))  # it trained


def test_adaptive_decisions_use_the_global_statistic(ranks) -> None:
    """s_t is the mean over replicas of ||g_r||²: the same on both ranks although rank 1's is ~100x rank 0's."""
    for preset in ("aesam", "aelooksam"):
        first, second = ranks[0]["presets"][preset]["decisions"], ranks[1]["presets"][preset]["decisions"]
        assert [s for _, s in first] == [s for _, s in second]
        assert 0 < sum(d for d, _ in first) < len(first)  # both kinds of step happened


def test_two_step_loop_equals_the_closure_form(ranks) -> None:
    for preset in ("sam", "aesam", "looksam"):
        for rank in ranks:
            torch.testing.assert_close(rank["two_step"][preset], rank["presets"][preset]["state"], rtol=0, atol=1e-12)


def test_a_non_finite_gradient_on_one_replica_skips_the_step_everywhere(ranks) -> None:
    assert all(rank["non_finite"]["skipped"] for rank in ranks)
    assert all(rank["non_finite"]["steps"] == 2 for rank in ranks)
    assert torch.equal(ranks[0]["non_finite"]["state"], ranks[1]["non_finite"]["state"])


def test_gradient_allreduces_per_step(ranks) -> None:
    counts = ranks[0]["allreduce_counts"]
    assert counts["sgd"] >= 1
    assert counts["sam"] == counts["sgd"]  # per-replica ε: only the second pass all-reduces
    assert counts["sam_global"] == 2 * counts["sgd"]
    assert counts["periodicsam_erm"] == counts["sgd"]  # an ERM step: the first pass is all-reduced by DDP
    assert counts["lateaesam_erm"] == counts["sgd"]  # before the late phase: decided before the pass, no ||g||
    assert counts["aesam_erm"] == 0  # decided after a per-replica pass: SAM averages the gradient itself (once)


def test_a_policy_that_could_desynchronise_is_an_error_at_construction(ranks) -> None:
    assert all("replica_consistent" in rank["construction_errors"]["custom_policy"] for rank in ranks)


def test_epsilon_from_is_checked() -> None:
    with pytest.raises(ValueError, match="unknown epsilon_from 'local'; valid: replica, global"):
        PRESETS["sam"](model().parameters(), epsilon_from="local")


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_resuming_from_torch_distributed_checkpoint_continues_bitwise(ranks, preset: str) -> None:
    for rank in ranks:
        result = rank["dcp_resume"][preset]
        assert _same(result["restored"], result["expected"])  # counters and the policy's state, exactly
        assert result["expected"][0] == 3 and result["equal"] and result["trained"]


def _same(a: object, b: object) -> bool:
    """Exact equality of nested tuples/dicts holding numbers, strings and tensors (RandomSAM's generator state)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, tuple | list) and isinstance(b, tuple | list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_ddp_msam_equals_single_process_msam(ranks, base: str) -> None:
    """Equal shards: DDP's averaged gradient is the whole batch's, so MSAM's momentum and perturbation are too."""
    net = plain_model()
    opt = msam_of(net.parameters(), base)
    for x, y in batches(2):
        opt.step(closure_of(net, x, y))
    with opt.unperturbed():
        weights = flat_state(net)
    for rank in ranks:
        torch.testing.assert_close(rank["msam"][base]["perturbed"], flat_state(net), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(rank["msam"][base]["weights"], weights, rtol=1e-10, atol=1e-10)
    assert not torch.equal(weights, flat_state(net))  # the replicas hold w̃ between steps, as one process does
