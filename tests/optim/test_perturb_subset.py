"""Parameter-subset perturbation (SAM-ON): ε = ρ g_S/||g_S|| on the subset S, zero elsewhere, for every preset."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor, nn

from sharpness import AESAM, SAM, LateSAM, LookSAM, RandomSAM, perturb_subset
from sharpness.models import build_model
from sharpness.optim.registry import build_optimizer

RHO = 0.3


class Net(nn.Module):
    """A BatchNorm named ``foo``, a Linear named ``norm`` (not a normalisation layer), a LayerNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.lin1 = nn.Linear(4, 6)
        self.foo = nn.BatchNorm1d(6)
        self.norm = nn.Linear(6, 6)
        self.ln = nn.LayerNorm(6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.ln(self.norm(torch.tanh(self.foo(self.lin1(x))))))


def _net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    net = Net().double()
    with torch.no_grad():  # affine parameters away from 1 / 0, so that ASAM's T_w matters
        for p in (net.foo.weight, net.foo.bias, net.ln.weight, net.ln.bias):
            p.add_(torch.randn_like(p))
    return net


def _data() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randn(10, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (10,), generator=g)


SUBSETS = {
    "norm": ["foo.weight", "foo.bias", "ln.weight", "ln.bias"],
    "lin1,head.weight": ["lin1.weight", "lin1.bias", "head.weight"],
    "norm.weight": ["norm.weight"],
}
PRESETS = {
    "sam": lambda params, **kw: SAM(params, torch.optim.SGD, RHO, lr=0.1, **kw),
    "looksam": lambda params, **kw: LookSAM(params, torch.optim.SGD, RHO, k=3, lr=0.1, **kw),
    "aesam": lambda params, **kw: AESAM(params, torch.optim.SGD, RHO, total_steps=5, lr=0.1, **kw),
    "randomsam": lambda params, **kw: RandomSAM(params, torch.optim.SGD, RHO, prob=1.0, lr=0.1, **kw),
    "latesam": lambda params, **kw: LateSAM(params, torch.optim.SGD, RHO, start=0.0, total_steps=5, lr=0.1, **kw),
}


def _reference_epsilon(net: Net, selected: list[str], p: float, adaptive: bool, eta: float = 0.01) -> dict[str, Tensor]:
    """Plain autograd: h = T g on S (T = |w| + η for ASAM, 1 otherwise), ε = T · ρ-ball maximiser of <h, ·>."""
    x, y = _data()
    net = copy.deepcopy(net)
    named = dict(net.named_parameters())
    grads = dict(
        zip(named, torch.autograd.grad(nn.functional.cross_entropy(net(x), y), list(named.values())), strict=True)
    )
    scale = {n: (w.detach().abs() + eta if adaptive else torch.ones_like(w)) for n, w in named.items()}
    h = torch.cat([(scale[n] * grads[n]).flatten() for n in selected])
    if p == 2:
        unit = h / h.norm()
    else:  # p = ∞
        unit = torch.sign(h)
    out, offset = {n: torch.zeros_like(w) for n, w in named.items()}, 0
    for n in selected:
        size = named[n].numel()
        out[n] = RHO * scale[n] * unit[offset : offset + size].view_as(named[n])
        offset += size
    return out


def _epsilon(net: Net, opt: SAM) -> dict[str, Tensor]:
    """ε of the first step, read off the weights between first_step and restore."""
    x, y = _data()
    before = {n: w.detach().clone() for n, w in net.named_parameters()}
    nn.functional.cross_entropy(net(x), y).backward()
    assert opt.wants_sam_step()
    opt.first_step(zero_grad=True)
    moved = {n: w.detach() - before[n] for n, w in net.named_parameters()}
    opt.restore()
    return moved


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("subset", SUBSETS)
@pytest.mark.parametrize(("p", "adaptive"), [(2.0, False), (math.inf, False), (2.0, True)], ids=["sam", "linf", "asam"])
def test_epsilon_lives_on_the_subset_and_is_normalised_there(
    preset: str, subset: str, p: float, adaptive: bool
) -> None:
    net = _net()
    extra = {"adaptive": True, "adaptive_scope": "all"} if adaptive else {}
    opt = PRESETS[preset](perturb_subset(net, subset), p=p, **extra)
    moved = _epsilon(net, opt)
    expected = _reference_epsilon(net, SUBSETS[subset], p, adaptive)
    for name, eps in moved.items():
        torch.testing.assert_close(eps, expected[name], rtol=1e-10, atol=1e-12, msg=name)
        assert (name in SUBSETS[subset]) or not eps.any()


def test_registry_asam_rescales_the_normalisation_parameters_it_perturbs() -> None:
    """``asam --perturb norm`` is ASAM-ON: T_w = |w| + η on the 1-D affine parameters (scope "all"), against plain
    autograd; other subsets keep ASAM's default scope (tensors with ndim >= 2)."""
    net = _net()
    moved = _epsilon(net, build_optimizer("asam", net, lr=0.1, rho=RHO, perturb="norm"))
    expected = _reference_epsilon(net, SUBSETS["norm"], 2.0, adaptive=True)
    for name, eps in moved.items():
        torch.testing.assert_close(eps, expected[name], rtol=1e-10, atol=1e-12, msg=name)
    plain = _reference_epsilon(net, SUBSETS["norm"], 2.0, adaptive=False)
    assert not torch.allclose(expected["foo.weight"], plain["foo.weight"])  # the scaling is visible
    opt = build_optimizer("asam", _net(), lr=0.1, rho=RHO, perturb="lin1,head.weight")
    assert {group["sam_adaptive_scope"] for group in opt.param_groups} == {"weights"}


def test_norm_is_found_by_module_type_not_by_name() -> None:
    net = _net()
    groups = perturb_subset(net, "norm")
    names = {id(p): n for n, p in net.named_parameters()}
    assert [[names[id(p)] for p in g["params"]] for g in groups] == [
        SUBSETS["norm"],
        ["lin1.weight", "lin1.bias", "norm.weight", "norm.bias", "head.weight", "head.bias"],
    ]
    assert "sam_perturb" not in groups[0] and groups[1]["sam_perturb"] is False


def test_the_whole_model_is_stepped_with_the_gradient_at_the_perturbed_point() -> None:
    net, (x, y) = _net(), _data()
    reference = copy.deepcopy(net)
    eps = _reference_epsilon(reference, SUBSETS["norm"], 2.0, False)
    named = dict(reference.named_parameters())
    with torch.no_grad():
        for n, w in named.items():
            w.add_(eps[n])
    grads = torch.autograd.grad(nn.functional.cross_entropy(reference(x), y), list(named.values()))
    opt = SAM(perturb_subset(net, "norm"), torch.optim.SGD, RHO, lr=0.1)

    def closure() -> Tensor:
        loss = nn.functional.cross_entropy(net(x), y)
        loss.backward()
        return loss

    start = {n: w.detach().clone() for n, w in net.named_parameters()}
    opt.step(closure)
    for (n, w), g in zip(net.named_parameters(), grads, strict=True):
        torch.testing.assert_close(w.detach(), start[n] - 0.1 * g, rtol=1e-12, atol=1e-13, msg=n)
        assert not torch.equal(w.detach(), start[n])  # non-perturbed parameters are stepped too


def test_user_groups_keep_their_options_and_the_setting_survives_a_checkpoint() -> None:
    net = _net()
    decayed = [net.lin1.weight, net.foo.weight]
    rest = [p for p in net.parameters() if all(p is not q for q in decayed)]
    groups = perturb_subset(net, "norm", groups=[{"params": decayed, "weight_decay": 0.1}, {"params": rest}])
    assert [(len(g["params"]), g.get("weight_decay"), g.get("sam_perturb", True)) for g in groups] == [
        (1, 0.1, True),
        (1, 0.1, False),
        (3, None, True),
        (5, None, False),
    ]
    opt = SAM(groups, torch.optim.SGD, RHO, lr=0.1)
    state = opt.state_dict()
    assert [g["sam_perturb"] for g in state["param_groups"]] == [True, False, True, False]
    again = SAM(perturb_subset(net, "all"), torch.optim.SGD, RHO, lr=0.1)
    assert len(again.param_groups) == 1 and again.param_groups[0]["sam_perturb"] is True


@pytest.mark.parametrize(
    ("perturb", "message"),
    [
        ("lin2", r"perturb: no parameter of Net is named or under 'lin2'; .* one of: foo, head, lin1, ln, norm$"),
        ("lin", r"is named or under 'lin';"),  # a prefix is a whole dotted component
        (" , ", "perturb must be 'all', 'norm' or parameter-name prefixes"),
    ],
)
def test_bad_prefixes(perturb: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        perturb_subset(_net(), perturb)


def test_norm_on_a_model_without_normalisation_layers_names_the_models_that_have_them() -> None:
    model = build_model("cnn1d", input_shape=(40,), num_classes=10)
    with pytest.raises(
        ValueError, match=r"perturb='norm': CNN1D has no normalisation layer .* cnn1d-bn, cnn1d-ln"
    ) as e:
        perturb_subset(model, "norm")
    assert "\n" not in str(e.value)
    bn = build_model("cnn1d-bn", input_shape=(40,), num_classes=10)
    assert [p.shape for p in perturb_subset(bn, "norm")[0]["params"]] == [(32,)] * 6


def test_the_group_key_is_checked() -> None:
    net = _net()
    opt = SAM([{"params": list(net.parameters()), "sam_perturb": "no"}], torch.optim.SGD, lr=0.1)
    with pytest.raises(TypeError, match="SAM: perturb must be True or False"):  # checked when used, as every sam_ key
        _epsilon(net, opt)
    with pytest.raises(ValueError, match="use 'sam_perturb'"):
        SAM([{"params": list(_net().parameters()), "perturb": False}], torch.optim.SGD, lr=0.1)


def test_a_non_finite_gradient_outside_the_subset_skips_the_step() -> None:
    net = _net()
    opt = SAM(perturb_subset(net, "norm"), torch.optim.SGD, RHO, lr=0.1)
    before = [p.detach().clone() for p in net.parameters()]
    x, y = _data()
    nn.functional.cross_entropy(net(x), y).backward()
    net.head.weight.grad[0, 0] = math.inf
    assert not opt.first_step()
    opt.second_step()
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True)) and opt.steps == 0


NAMES = [f"{module}.{kind}" for module in ("lin1", "foo", "norm", "ln", "head") for kind in ("weight", "bias")]


@given(chosen=st.sets(st.sampled_from(NAMES), min_size=1))
def test_property_any_subset_gets_a_radius_rho_step_on_it_alone(chosen: set[str]) -> None:
    net = _net()
    moved = _epsilon(net, SAM(perturb_subset(net, sorted(chosen)), torch.optim.SGD, RHO, lr=0.1))
    inside = torch.cat([moved[n].flatten() for n in sorted(chosen)])
    assert float(inside.norm()) == pytest.approx(RHO, rel=1e-12)
    assert all(not eps.any() for n, eps in moved.items() if n not in chosen)
