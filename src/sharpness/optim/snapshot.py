"""Exact (bitwise) save/restore of a list of tensors, with storage reused across saves."""

from __future__ import annotations

import torch
from torch import Tensor


class TensorSnapshot:
    """Holds a bitwise copy of some tensors and writes it back on :meth:`restore`.

    Restoring copies the saved values (``torch._foreach_copy_``), it never undoes an update by subtraction, so
    the result is exact in every dtype. The copy buffers are kept and reused while :meth:`save` is called with
    the same tensor objects, so a training loop allocates them once.
    """

    def __init__(self) -> None:
        self._sources: list[Tensor] = []
        self._ids: tuple[int, ...] = ()
        self._copies: list[Tensor] = []
        self._saved = False

    @torch.no_grad()
    def save(self, tensors: list[Tensor]) -> None:
        """Copy ``tensors`` (one device and dtype per call is fastest, but any mix works)."""
        ids = tuple(map(id, tensors))
        if ids != self._ids:
            self._sources, self._ids = list(tensors), ids
            self._copies = [t.detach().clone() for t in tensors]
        elif tensors:
            torch._foreach_copy_(self._copies, tensors)
        self._saved = True

    @torch.no_grad()
    def restore(self) -> None:
        """Write the saved values back into the tensors they came from; a no-op if nothing is held."""
        if self._saved and self._sources:
            torch._foreach_copy_(self._sources, self._copies)
        self._saved = False
