"""Test-wide settings.

- Tiny models run fastest single-threaded, and it avoids thread oversubscription.
- Hypothesis profiles: ``dev`` (the default, for ``make test`` on a laptop) runs few examples per property; ``ci``
  (chosen when the environment has ``CI=true``, as CI sets it) runs many more, so that a CI run checks at least
  10,000 examples in total. ``HYPOTHESIS_PROFILE=ci make test`` runs the large profile anywhere.
"""

import os

import torch
from hypothesis import HealthCheck, settings

torch.set_num_threads(1)

_COMMON = dict(deadline=None, derandomize=False, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=25, **_COMMON)
settings.register_profile("ci", max_examples=2500, print_blob=True, **_COMMON)
_default = "ci" if os.environ.get("CI", "").lower() in ("1", "true", "yes") else "dev"
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", _default))
