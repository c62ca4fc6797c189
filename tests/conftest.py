"""Test-wide settings: tiny models run fastest single-threaded, and it avoids thread oversubscription."""

import torch

torch.set_num_threads(1)
