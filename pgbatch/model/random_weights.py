"""Random weights in the published layout (flat big_vision names), for tests, the demo and benchmarks (numpy only).

Norm scales and biases are non-zero so that convention bugs (1 + scale, bias placement) show up in parity tests.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np

from pgbatch.model import configs
from pgbatch.model.configs import PaliGemmaConfig


def init_std(name: str, shape: tuple[int, ...]) -> float:
  """The standard deviation of tensor `name`: 0.1 for scales and biases, 0.5 for embeddings, else fan_in**-0.5."""
  if name.endswith(("scale", "bias")):
    return 0.1
  if name.endswith("pos_embedding") or name.endswith("input_embedding"):
    return 0.5
  fan_in = shape[-2] if len(shape) >= 2 else shape[-1]
  if "einsum" in name or name.endswith("linear"):
    fan_in = shape[-2]
  return fan_in ** -0.5


def random_tensors(variant: str | PaliGemmaConfig, seed: int = 0, dtype=np.float32) -> Iterator[tuple[str, np.ndarray]]:
  """(name, array) one tensor at a time, in `configs.param_shapes` order: never the whole model in memory."""
  cfg = configs.get(variant) if isinstance(variant, str) else variant
  rng = np.random.default_rng(seed)
  for name, shape in configs.param_shapes(cfg).items():
    yield name, (rng.standard_normal(shape, dtype=np.float32) * init_std(name, shape)).astype(dtype)


def random_params(variant: str | PaliGemmaConfig, seed: int = 0, dtype=np.float32) -> dict[str, np.ndarray]:
  """All of `random_tensors` as a dict."""
  return dict(random_tensors(variant, seed, dtype))
