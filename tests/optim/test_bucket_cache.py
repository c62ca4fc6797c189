"""BucketCache: the remembered bucket layout always equals a fresh collect_buckets, whatever changes between steps."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from sharpness.optim.buckets import BucketCache, collect_buckets
from sharpness.optim.groups import defaults_of

DEFAULTS = defaults_of(rho=0.05, p=2.0, eta=0.01, adaptive=False, adaptive_scope="weights",
                       include_weight_decay=False, perturb=True)  # fmt: skip
CHANGES = ("new gradients", "drop a gradient", "to float64", "toggle ASAM", "ASAM scope", "add a group", "replace")


def _described(buckets):
    return [(b.key, b.scaled, [id(t) for t in b.owners], [id(t) for t in b.params], [id(t) for t in b.grads])
            for b in buckets]  # fmt: skip


def _change(change: str, index: int, groups: list[dict], extra: list[nn.Parameter]) -> None:
    params = [p for group in groups for p in group["params"]]
    param = params[index % len(params)]
    if change == "new gradients":
        for p in params:
            p.grad = torch.randn_like(p)
    elif change == "drop a gradient":
        param.grad = None
    elif change == "to float64":  # as module.to() does: same Parameter object, new data (and gradient)
        param.data = param.data.double()
        param.grad = None if param.grad is None else param.grad.double()
    elif change == "toggle ASAM":
        group = groups[index % len(groups)]
        group["sam_adaptive"] = not group.get("sam_adaptive", False)
    elif change == "ASAM scope":
        group = groups[index % len(groups)]
        group["sam_adaptive_scope"] = "all" if group.get("sam_adaptive_scope") == "weights" else "weights"
    elif change == "add a group" and extra:
        new = extra.pop()
        new.grad = torch.randn_like(new)
        groups.append({"params": [new]})
    elif change == "replace":  # a group's parameter list edited in place
        group = groups[index % len(groups)]
        group["params"][0] = nn.Parameter(torch.randn(3, 2))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(CHANGES), st.integers(0, 10)), min_size=1, max_size=12))
def test_cached_layout_equals_a_fresh_one(changes) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2))
    groups = [{"params": [model[0].weight, model[0].bias]}, {"params": [model[2].weight, model[2].bias]}]
    extra = [nn.Parameter(torch.randn(4)), nn.Parameter(torch.randn(2, 2))]
    _change("new gradients", 0, groups, extra)
    cache = BucketCache()
    for change, index in changes:
        _change(change, index, groups, extra)
        cached = cache.collect(groups, DEFAULTS)
        assert _described(cached) == _described(collect_buckets(groups, DEFAULTS)), change
        assert all(b.scale is None for b in cached)  # fresh Bucket objects: ASAM's scale of a past step is gone


def test_gradients_are_collected_again_each_call_without_a_rebuild(monkeypatch) -> None:
    model = nn.Linear(3, 2)
    groups = [{"params": list(model.parameters())}]
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    cache = BucketCache()
    cache.collect(groups, DEFAULTS)
    rebuilds = []
    monkeypatch.setattr("sharpness.optim.buckets.collect_buckets", lambda *a: rebuilds.append(a))
    for p in model.parameters():  # a backward after zero_grad(set_to_none=True): new gradient tensors
        p.grad = torch.full_like(p, 2.0)
    (bucket,) = cache.collect(groups, DEFAULTS)
    assert rebuilds == [] and all(g is p.grad for g, p in zip(bucket.grads, model.parameters(), strict=True))
