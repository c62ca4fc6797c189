"""sharpness.data.iterate_batches / num_batches: coverage, sizes, determinism, argument checks."""

from __future__ import annotations

import pytest
import torch

from sharpness.data import iterate_batches, num_batches


def _data(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.arange(n, dtype=torch.float32)[:, None].repeat(1, 3)  # row i is (i, i, i)
    y = torch.arange(n) * 10
    return x, y


def _order(batches: list[tuple[torch.Tensor, torch.Tensor]]) -> list[int]:
    return torch.cat([xb[:, 0] for xb, _ in batches]).long().tolist()


@pytest.mark.parametrize("shuffle", [False, True])
def test_every_example_exactly_once_with_pairs_intact(shuffle: bool) -> None:
    x, y = _data(103)
    batches = list(iterate_batches(x, y, 10, shuffle=shuffle, generator=torch.Generator().manual_seed(0)))
    assert [len(xb) for xb, _ in batches] == [10] * 10 + [3]
    order = _order(batches)
    assert sorted(order) == list(range(103))
    for xb, yb in batches:
        assert torch.equal(yb, xb[:, 0].long() * 10)  # x and y stay paired
        assert torch.equal(xb[:, 0], xb[:, 2])  # whole rows are taken
    if shuffle:
        assert order != list(range(103))
    else:
        assert order == list(range(103))


def test_drop_last_and_num_batches() -> None:
    x, y = _data(10)
    for drop_last, sizes in ((False, [3, 3, 3, 1]), (True, [3, 3, 3])):
        for shuffle in (False, True):
            batches = list(iterate_batches(x, y, 3, shuffle=shuffle, drop_last=drop_last))
            assert [len(xb) for xb, _ in batches] == sizes
            assert num_batches(10, 3, drop_last) == len(sizes)
    dropped = list(iterate_batches(x, y, 3, shuffle=True, generator=torch.Generator().manual_seed(1), drop_last=True))
    assert len(set(_order(dropped))) == 9  # nine distinct examples, one left out
    assert num_batches(9, 3, False) == num_batches(9, 3, True) == 3
    assert num_batches(0, 4) == 0 and num_batches(5, 8) == 1 and num_batches(5, 8, drop_last=True) == 0
    assert list(iterate_batches(x, y, 32, shuffle=False, drop_last=True)) == []
    (only,) = iterate_batches(x, y, 32, shuffle=False)
    assert torch.equal(only[0], x)


def test_same_generator_seed_same_order_and_epochs_differ() -> None:
    x, y = _data(50)

    def epoch(generator: torch.Generator) -> list[int]:
        return _order(list(iterate_batches(x, y, 7, shuffle=True, generator=generator)))

    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    first, second = epoch(g1), epoch(g1)
    assert first == epoch(g2) and second == epoch(g2)  # same seed, same sequence of epochs
    assert first != second  # each call draws a fresh permutation
    assert first != epoch(torch.Generator().manual_seed(6))
    assert first == torch.randperm(50, generator=torch.Generator().manual_seed(5)).tolist()


def test_unshuffled_batches_are_views() -> None:
    x, y = _data(8)
    xb, yb = next(iterate_batches(x, y, 4, shuffle=False))
    assert xb.data_ptr() == x.data_ptr() and yb.data_ptr() == y.data_ptr()


@pytest.mark.parametrize("batch_size", [0, -1, 2.5, True, None])
def test_bad_batch_size(batch_size: object) -> None:
    x, y = _data(4)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        iterate_batches(x, y, batch_size, shuffle=False)  # raised at the call, not at the first next()
    with pytest.raises(ValueError, match="batch_size"):
        num_batches(4, batch_size)


def test_mismatched_lengths_and_bad_n() -> None:
    with pytest.raises(ValueError, match="same number of examples"):
        iterate_batches(torch.zeros(5, 2), torch.zeros(4), 2, shuffle=False)
    with pytest.raises(ValueError, match="n must be"):
        num_batches(-1, 2)
