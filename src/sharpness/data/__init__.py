"""Small data sets for examples, tests and benchmarks, generated locally (no downloads)."""

from sharpness.data.mnist1d import Mnist1D, load_mnist1d

__all__ = ["Mnist1D", "load_mnist1d"]
