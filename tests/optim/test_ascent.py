"""SAM's ascent as a composed object (sharpness.optim.ascent): each composition's ε against a dense re-derivation of
the formula written here, the flags as its shorthand, and the errors."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import sharpness
from sharpness.optim import ascent
from sharpness.optim.ascent import ASAMScaling, DualNormMap, Gradient, ParameterSubset, Perturbation, chain

RHO = 0.3
WEIGHT_DECAY = 0.2


def small_model() -> torch.nn.Module:
    torch.manual_seed(0)
    layers = [torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Tanh(), torch.nn.Linear(4, 2)]
    return torch.nn.Sequential(*layers).double()


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(8, 3, generator=generator, dtype=torch.float64), torch.randn(8, 2, generator=generator).double()


def loss_of(model: torch.nn.Module) -> torch.Tensor:
    x, y = batch()
    return torch.nn.functional.mse_loss(model(x), y)


def expected_epsilon(model: torch.nn.Module, perturbation: Perturbation, selected: set[str]) -> dict[str, torch.Tensor]:
    """ε = ρ T d(T (g + λw)) on the selected parameters, from one flat vector (the paper's formula, written out)."""
    model.zero_grad()
    loss_of(model).backward()
    names = [name for name, _ in model.named_parameters() if name in selected]
    params = dict(model.named_parameters())
    scaling = perturbation.scaling
    scales = {
        n: (params[n].detach().abs() + scaling.eta)
        if scaling is not None and (scaling.scope == "all" or params[n].ndim >= 2)
        else torch.ones_like(params[n])
        for n in names
    }
    wd = WEIGHT_DECAY if perturbation.gradient.include_weight_decay else 0.0
    h = torch.cat([(scales[n] * (params[n].grad + wd * params[n].detach())).flatten() for n in names])
    p = perturbation.dual_norm_map.p
    if p == 1:
        d = torch.zeros_like(h)
        d[h.abs().argmax()] = h[h.abs().argmax()].sign()
    elif math.isinf(p):
        d = h.sign()
    else:
        q = p / (p - 1)
        d = h.sign() * h.abs() ** (q - 1) / h.abs().pow(q).sum() ** ((q - 1) / q)
    out, start = {}, 0
    for n in names:
        size = params[n].numel()
        out[n] = RHO * scales[n] * d[start : start + size].view_as(params[n])
        start += size
    return out


SUBSETS = {"all": None, "norm": {"1.weight", "1.bias"}, "3": {"3.weight", "3.bias"}}
SCALINGS = [None, ASAMScaling(), ASAMScaling(eta=0.0, scope="all")]


@pytest.mark.parametrize("p", [1.0, 2.0, 3.0, math.inf])
@pytest.mark.parametrize("scaling", SCALINGS, ids=["sam", "asam-weights", "asam-all"])
@pytest.mark.parametrize("include_weight_decay", [False, True])
@pytest.mark.parametrize("subset", list(SUBSETS))
def test_composed_epsilon_is_the_formula(p, scaling, include_weight_decay, subset) -> None:
    model = small_model()
    perturbation = chain(Gradient(include_weight_decay), DualNormMap(p), ParameterSubset(subset))
    if scaling is not None:
        perturbation = chain(Gradient(include_weight_decay), scaling, DualNormMap(p), ParameterSubset(subset))
    selected = SUBSETS[subset] or {name for name, _ in model.named_parameters()}
    expected = expected_epsilon(model, perturbation, selected)
    before = {name: param.detach().clone() for name, param in model.named_parameters()}
    opt = sharpness.SAM(
        model.parameters(),
        torch.optim.SGD,
        RHO,
        perturbation=perturbation,
        model=model,
        lr=0.1,
        weight_decay=WEIGHT_DECAY,
    )
    model.zero_grad()
    loss_of(model).backward()
    opt.first_step()
    for name, param in model.named_parameters():
        moved = param.detach() - before[name]
        torch.testing.assert_close(moved, expected.get(name, torch.zeros_like(moved)), rtol=1e-10, atol=1e-13)
    opt.restore()


def test_the_flags_are_shorthand_for_the_same_steps() -> None:
    flags = {"adaptive": True, "p": 3.0, "eta": 0.05, "adaptive_scope": "all", "include_weight_decay": True}
    finals = []
    for kwargs in (flags, {"perturbation": Perturbation.from_flags(**flags)}):
        model = small_model()
        opt = sharpness.SAM(model.parameters(), torch.optim.SGD, RHO, lr=0.1, weight_decay=WEIGHT_DECAY, **kwargs)
        for _ in range(3):
            opt.step(lambda: (loss := loss_of(model)).backward() or loss)  # noqa: B023
        finals.append(torch.nn.utils.parameters_to_vector(model.parameters()))
        assert opt.param_groups[0]["sam_p"] == 3.0 and opt.param_groups[0]["sam_adaptive"]
    assert torch.equal(finals[0], finals[1])


stages = st.fixed_dictionaries(
    {},
    optional={
        "gradient": st.builds(Gradient, st.booleans()),
        "scaling": st.builds(ASAMScaling, st.floats(0, 1), st.sampled_from(["weights", "all"])),
        "dual_norm_map": st.builds(DualNormMap, st.one_of(st.floats(1, 100), st.just(math.inf))),
    },
)


@given(stages, st.permutations(range(3)))
def test_chain_fills_defaults_in_any_order_and_the_flags_round_trip(named, order) -> None:
    given_stages = list(named.values())
    ordered = [given_stages[i] for i in order if i < len(given_stages)]
    composed = chain(*ordered)
    assert composed == Perturbation(**named)
    assert Perturbation.from_flags(**composed.flags()) == composed
    group = {"sam_" + name: value for name, value in composed.flags().items()}
    assert Perturbation.from_group(group) == composed


@pytest.mark.parametrize("preset", ["PeriodicSAM", "RandomSAM", "LookSAM", "AESAM", "AELookSAM", "LateSAM"])
def test_every_preset_takes_a_perturbation(preset) -> None:
    model = small_model()
    perturbation = chain(ASAMScaling(eta=0.0, scope="all"), DualNormMap(math.inf), ParameterSubset("norm"))
    opt = getattr(sharpness, preset)(
        model.parameters(), torch.optim.SGD, perturbation=perturbation, model=model, lr=0.1
    )
    assert isinstance(opt, sharpness.SAM)
    assert [(len(g["params"]), g["sam_perturb"], g["sam_p"], g["sam_eta"]) for g in opt.param_groups] == [
        (2, True, math.inf, 0.0),
        (4, False, math.inf, 0.0),
    ]


def test_a_checkpoint_of_a_composed_sam_loads_into_the_flag_form() -> None:
    model = small_model()
    composed = sharpness.SAM(model.parameters(), torch.optim.SGD, RHO, perturbation=chain(DualNormMap(4.0)), lr=0.1)
    plain = sharpness.SAM(model.parameters(), torch.optim.SGD, RHO, lr=0.1)
    plain.load_state_dict(composed.state_dict())
    assert Perturbation.from_group(plain.param_groups[0]) == chain(DualNormMap(4.0))


@pytest.mark.parametrize(
    ("build", "error", "message"),
    [
        (lambda: chain(DualNormMap(), DualNormMap(3.0)), ValueError, "two DualNormMap stages"),
        (lambda: chain("asam"), TypeError, "not a stage of SAM's ascent"),
        (lambda: DualNormMap(0.5), ValueError, "p must be"),
        (lambda: ASAMScaling(scope="bias"), ValueError, "scope"),
        (lambda: ASAMScaling(eta=-1.0), ValueError, "eta must be"),
        (lambda: ParameterSubset(" , "), ValueError, "perturb must be"),
        (lambda: Gradient(include_weight_decay="yes"), TypeError, "include_weight_decay must be True or False"),
    ],
)
def test_bad_stages_are_one_line_errors(build, error, message) -> None:
    with pytest.raises(error, match=message) as info:
        build()
    assert "\n" not in str(info.value)


def test_sam_refuses_what_it_cannot_honour() -> None:
    model = small_model()
    asam = chain(ASAMScaling())
    with pytest.raises(TypeError, match="given twice, as perturbation= and as adaptive=, p="):
        sharpness.SAM(model.parameters(), torch.optim.SGD, perturbation=asam, adaptive=True, p=3.0, lr=0.1)
    with pytest.raises(TypeError, match="must be a sharpness.optim.ascent.Perturbation"):
        sharpness.SAM(model.parameters(), torch.optim.SGD, perturbation=ASAMScaling(), lr=0.1)
    norm_only = chain(ParameterSubset("norm"))
    with pytest.raises(ValueError, match="needs the model: pass model="):
        sharpness.SAM(model.parameters(), torch.optim.SGD, perturbation=norm_only, lr=0.1)
    with pytest.raises(ValueError, match="not named_parameters"):
        sharpness.SAM(model.named_parameters(), torch.optim.SGD, perturbation=norm_only, model=model, lr=0.1)
    built = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="already-built base optimizer"):
        sharpness.SAM(None, built, perturbation=norm_only, model=model)


def test_module_is_reachable_from_the_package() -> None:
    assert sharpness.optim.ascent is ascent
