"""Loading a checkpoint onto devices: each tensor read (cast while reading) and placed on its sharding, one at a
time, so host memory holds about one tensor. Params become a nested dict in big_vision's layout."""
from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from pgbatch import adapters as adapters_lib, checkpoints
from pgbatch.model import configs, sharding
from pgbatch.model.configs import PaliGemmaConfig
from pgbatch.model.replica import PaliGemma


def unflatten(flat: dict[str, Any]) -> dict:
  """{'a/b/c': x} -> {'a': {'b': {'c': x}}} (params are plain nested dicts, as in big_vision)."""
  return traverse_util.unflatten_dict(flat, sep="/")


def replica_mesh(accelerator: str, variant: Optional[str]):
  """The mesh of one model replica over this process's devices: None on CPU or with one device, else the
  ("data", "model") shape `placement.mesh_shape` picks for `variant` (tensor parallel only as far as needed)."""
  devices = jax.devices()
  if accelerator == "cpu" or len(devices) < 2:
    return None
  from pgbatch import placement  # pylint: disable=g-import-not-at-top  (the sizing policy; imports no JAX)
  data, model = placement.mesh_shape(len(devices), variant, accelerator_kind=accelerator)
  return sharding.make_mesh(data, model)


def _put(name: str, array, dtype, mesh):
  array = np.asarray(array)
  if dtype is not None:
    array = array.astype(dtype)
  if mesh is None:
    return jax.device_put(array)
  return jax.device_put(array, sharding.param_sharding(name, array.shape, mesh))


def place(ckpt, dtype=None, mesh=None) -> Iterator[tuple[str, Any]]:
  """Yields (name, jax.Array): each tensor read (cast to `dtype` while reading), then put on its
  `sharding.param_sharding` over `mesh` (or the default device). At most one transfer is in flight, so
  host memory holds about one tensor (two while the previous one is still being copied)."""
  dtype = None if dtype is None else np.dtype(dtype)
  prev = None
  for name, array in ckpt.tensors(dtype=dtype):
    target = sharding.param_sharding(name, array.shape, mesh) if mesh is not None else None
    placed = jax.device_put(array, target)
    del array
    if prev is not None:
      prev.block_until_ready()
    prev = placed
    yield name, placed
  if prev is not None:
    prev.block_until_ready()


def from_params(cfg: PaliGemmaConfig, flat_params: dict[str, Any], dtype="float32", mesh=None,
                info=None) -> PaliGemma:
  """Builds a model from flat big_vision-named arrays (placing each on its sharding)."""
  placed = {name: _put(name, value, jnp.dtype(dtype), mesh) for name, value in flat_params.items()}
  return PaliGemma(cfg, unflatten(placed), mesh, info)


def load(uri: str, dtype: str = "bfloat16", mesh=None, variant: str | None = None,
         adapters: Sequence[str] = (), **config_overrides) -> PaliGemma:
  """Loads a checkpoint from any fsspec URL: big_vision .npz (`.b16.npz`, `.f16.npz`, split `.npz.partNN`) or a
  Hugging Face safetensors directory (single file or sharded with an index).

  Names and shapes are checked first (MissingKeyError / UnexpectedKeyError / ShapeMismatchError, before anything
  is placed); then each tensor is read, cast to `dtype` while reading and placed on its NamedSharding over `mesh`
  (or the default device), one at a time, so host memory holds about one tensor. `adapters` (PEFT LoRA directories
  or big_vision .npz deltas, see `pgbatch.adapters`) are checked before anything is placed and merged into each
  tensor on the device as it arrives. `variant` overrides (and is
  checked against) the architecture inferred from the shapes; `config_overrides` replace decoder fields (e.g.
  final_logits_softcap=0.0). The result's `.info` has the checkpoint URI and digest (provenance).
  """
  with checkpoints.open_checkpoint(uri, variant=variant) as ckpt:
    try:
      cfg = ckpt.config.replace(**config_overrides) if config_overrides else ckpt.config
    except TypeError:
      known = ", ".join(f.name for f in dataclasses.fields(configs.TextConfig))
      raise ValueError(f"unknown config override(s) {sorted(config_overrides)}; known: {known}") from None
    ckpt.check(cfg)
    opened = adapters_lib.open_all(adapters, cfg)
    try:
      placed = dict(adapters_lib.merge(place(ckpt, dtype, mesh), opened, mesh))
    finally:
      adapters_lib.close_all(opened)
  return PaliGemma(cfg, unflatten(placed), mesh, ckpt.info, tuple(a.info for a in opened))
