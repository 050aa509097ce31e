"""Mesh and parameter layout: tensor parallelism on "model", batch on "data".

A parameter axis is split over "model" when it is a heads / mlp / vocab axis and divides evenly by the
"model" size; everything else is replicated. Rules are keyed by the last component of the big_vision name.
"""
from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# name suffix -> index of the axis to split over "model", counted from the end (so stacking adds nothing).
_MODEL_AXIS_FROM_END = {
    "q_einsum/w": -3,            # [L, N, D, H]: heads
    "kv_einsum/w": -3,           # [L, 2, K, D, H]: kv heads (MQA K=1 stays replicated)
    "attn_vec_einsum/w": -3,     # [L, N, H, D]: heads
    "mlp/gating_einsum": -1,     # [L, 2, D, F]
    "mlp/linear": -2,            # [L, F, D]
    "embedder/input_embedding": -2,  # [V, D]: vocab
    "query/kernel": -2, "key/kernel": -2, "value/kernel": -2,   # [L, W, N, H]
    "query/bias": -2, "key/bias": -2, "value/bias": -2,         # [L, N, H]
    "out/kernel": -3,            # [L, N, H, W]
    "Dense_0/kernel": -1, "Dense_0/bias": -1,                   # [L, W, F]
    "Dense_1/kernel": -2,        # [L, F, W]
}


def make_mesh(data: int | None = None, model: int = 1, devices=None) -> Mesh:
  """Mesh(("data", "model")) over the local devices; data defaults to all devices / model."""
  devices = list(devices if devices is not None else jax.local_devices())
  data = data or len(devices) // model
  if data * model != len(devices):
    raise ValueError(f"mesh {data}x{model} does not match {len(devices)} devices")
  return Mesh(np.array(devices).reshape(data, model), ("data", "model"))


def param_spec(name: str, shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
  n_model = mesh.shape["model"]
  spec = [None] * len(shape)
  for suffix, axis in _MODEL_AXIS_FROM_END.items():
    if name.endswith(suffix) and n_model > 1 and shape[axis] % n_model == 0:
      spec[axis] = "model"
      break
  return PartitionSpec(*spec)


def param_sharding(name: str, shape, mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, param_spec(name, tuple(shape), mesh))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """Batch-leading arrays: axis 0 over "data"."""
  return NamedSharding(mesh, PartitionSpec("data", *([None] * (ndim - 1))))


def round_up(n: int, multiple: int) -> int:
  return int(math.ceil(n / multiple) * multiple)
