"""Old names kept for one release: keyword arguments, attributes and CLI flags renamed to the counts' vocabulary.

- :func:`renamed_arguments`: a decorator that accepts the old keyword names of a function (or ``__init__``),
  warns ``DeprecationWarning`` naming the new one, and passes the value on under the new name; both names at
  once are a ``TypeError``.
- :func:`renamed_attribute`: a read-only property under the old name of an attribute (e.g. a result field).
- :class:`DeprecatedFlag`: an ``argparse`` action for the old spelling of a renamed flag: hidden from ``--help``,
  it stores into the new flag's destination and prints a one-line note to stderr.

Every message has the same form: ``OLD is deprecated and will be removed in the next release; use NEW``.
The vocabulary of counts is in ``docs/curvature.md`` (section "Counts").
"""

from __future__ import annotations

import argparse
import functools
import sys
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["renamed_arguments", "renamed_attribute", "DeprecatedFlag", "deprecation_message"]

F = TypeVar("F", bound=Callable[..., Any])


def deprecation_message(old: str, new: str) -> str:
    """The one-line note for a renamed name."""
    return f"{old} is deprecated and will be removed in the next release; use {new}"


def _owner(func: Callable[..., Any]) -> str:
    """``name()`` of a function, ``Class()`` of an ``__init__``, as the caller writes it."""
    return func.__qualname__.removesuffix(".__init__").rpartition(".<locals>.")[2]


def renamed_arguments(**renames: str) -> Callable[[F], F]:
    """Accept the old keyword names ``old=new`` of the decorated function for one release.

    An old name given by keyword is passed on as the new one with a ``DeprecationWarning`` (attributed to the
    caller) that names the new one; giving both is a ``TypeError``. The signature (``inspect.signature``) and the
    docstring stay those of the function.
    """

    def decorate(func: F) -> F:
        owner = _owner(func)

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            for old, new in renames.items():
                if old not in kwargs:
                    continue
                if new in kwargs:
                    raise TypeError(f"{owner}() got both {old!r} and {new!r}; pass only {new!r} (the new name)")
                message = deprecation_message(f"{owner}'s argument {old}", new)
                warnings.warn(message, DeprecationWarning, stacklevel=2)
                kwargs[new] = kwargs.pop(old)
            return func(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate


def renamed_attribute(old: str, new: str) -> property:
    """A read-only property ``old`` that warns and returns ``self.<new>`` (for a class body: ``old = ...``)."""

    def getter(self: Any) -> Any:
        owner = type(self).__name__
        warnings.warn(deprecation_message(f"{owner}.{old}", f"{owner}.{new}"), DeprecationWarning, stacklevel=2)
        return getattr(self, new)

    return property(getter, doc=f"Deprecated alias of :attr:`{new}`.")


class DeprecatedFlag(argparse.Action):
    """The old spelling of a renamed flag: stores into the new flag's ``dest``, notes the rename on stderr.

    Add it with ``help=argparse.SUPPRESS`` and ``default=argparse.SUPPRESS`` (so it neither shows in ``--help``
    nor overrides the new flag's default) and ``new=`` the new flag, e.g.
    ``parser.add_argument("--samples", dest="trace_matvecs", new="--trace-matvecs", action=DeprecatedFlag, ...)``.
    """

    def __init__(self, option_strings: list[str], dest: str, *, new: str, **kwargs: Any) -> None:
        self.new = new
        super().__init__(option_strings, dest, **kwargs)

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, option: str | None = None
    ) -> None:
        print(f"sharpness: {deprecation_message(str(option), self.new)}", file=sys.stderr)
        setattr(namespace, self.dest, values)
