"""PaliGemma 1/2 in JAX: `load` a checkpoint, then `logits` / `generate`.

    m = pgbatch.model.load(uri, dtype="bfloat16", mesh=None)
    m.logits(images, tokens, prefix_len)        # float32 [B, T, V]
    m.generate(images, prompts, max_new_tokens) # list of new-token lists, ending at EOS if emitted

Params are a plain nested dict in big_vision's layout (see `configs.param_shapes`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pgbatch.model import configs, paligemma, sharding
from pgbatch.model.sharding import make_mesh  # noqa: F401  (public)
from pgbatch.model.configs import PaliGemmaConfig

EOS = paligemma.EOS
PROMPT_BUCKETS = (8, 16, 32, 64, 128, 256, 512)


def unflatten(flat: dict[str, Any]) -> dict:
  """{'a/b/c': x} -> {'a': {'b': {'c': x}}} (params are plain nested dicts, as in big_vision)."""
  from flax import traverse_util
  return traverse_util.unflatten_dict(flat, sep="/")


def random_params(variant: str | PaliGemmaConfig, seed: int = 0, dtype=np.float32) -> dict[str, np.ndarray]:
  """Random weights in the published layout (flat big_vision names). Norm scales and biases are non-zero
  so that convention bugs (1 + scale, bias placement) show up in parity tests."""
  cfg = configs.get(variant) if isinstance(variant, str) else variant
  rng = np.random.default_rng(seed)
  out = {}
  for name, shape in configs.param_shapes(cfg).items():
    if name.endswith(("scale", "bias")):
      std = 0.1
    elif name.endswith("pos_embedding") or name.endswith("input_embedding"):
      std = 0.5
    else:
      fan_in = shape[-2] if len(shape) >= 2 else shape[-1]
      if "einsum" in name or name.endswith("linear"):
        fan_in = shape[-2]
      std = fan_in ** -0.5
    out[name] = (rng.standard_normal(shape, dtype=np.float32) * std).astype(dtype)
  return out


def _put(name: str, array, dtype, mesh):
  array = np.asarray(array)
  if dtype is not None:
    array = array.astype(dtype)
  if mesh is None:
    return jax.device_put(array)
  return jax.device_put(array, sharding.param_sharding(name, array.shape, mesh))


def _bucket(n: int, buckets: Sequence[int]) -> int:
  for b in buckets:
    if n <= b:
      return b
  return sharding.round_up(n, buckets[-1])


@dataclasses.dataclass
class PaliGemma:
  """A PaliGemma replica on one device or a ("data", "model") mesh."""
  config: PaliGemmaConfig
  params: dict
  mesh: Optional[jax.sharding.Mesh] = None
  info: Any = None  # checkpoint provenance (uri, digest) when loaded from a checkpoint

  def __post_init__(self):
    self._encode = jax.jit(paligemma.encode_images, static_argnames="cfg")
    self._logits = jax.jit(paligemma.text_logits, static_argnames="cfg")

  @property
  def dtype(self):
    return self.params["llm"]["embedder"]["input_embedding"].dtype

  @property
  def data_parallelism(self) -> int:
    return self.mesh.shape["data"] if self.mesh is not None else 1

  def put_batch(self, array):
    """Places a batch-leading array: sharded over "data" on a mesh."""
    if self.mesh is None:
      return jnp.asarray(array)
    return jax.device_put(array, sharding.batch_sharding(self.mesh, np.ndim(array)))

  def encode_images(self, images):
    """float [B, R, R, 3] in [-1, 1] -> image tokens [B, P, D]."""
    return self._encode(self.params, self.put_batch(images), cfg=self.config)

  def logits(self, images, tokens, prefix_len):
    """images float32 [B, R, R, 3] in [-1, 1]; tokens int32 [B, T] (BOS first); prefix_len int32 [B].
    Returns float32 [B, T, V]."""
    return self._logits(self.params, self.put_batch(np.asarray(images, np.float32)),
                        self.put_batch(np.asarray(tokens, np.int32)),
                        self.put_batch(np.asarray(prefix_len, np.int32)), cfg=self.config)

  def generate(self, images, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
    """Greedy decoding. images float [B, R, R, 3] in [-1, 1]; prompts: B token lists (BOS … "\n")."""
    images = np.asarray(images, np.float32)
    b = len(prompts)
    padded = sharding.round_up(b, self.data_parallelism)
    if padded != b:
      images = np.concatenate([images, np.zeros((padded - b, *images.shape[1:]), images.dtype)])
    zimg = self.encode_images(images)
    return self.generate_from_image_tokens(zimg, prompts, max_new_tokens)[:b]

  def generate_from_image_tokens(self, zimg, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                                 prompt_buckets: Sequence[int] = PROMPT_BUCKETS) -> list[list[int]]:
    """zimg [B', P, D] (B' >= len(prompts), extra rows are padding) -> new tokens per prompt."""
    tokens, lengths, valid = pad_prompts(prompts, zimg.shape[0], prompt_buckets)
    out, _ = paligemma.generate_tokens(
        self.params, zimg, self.put_batch(tokens), self.put_batch(lengths), self.put_batch(valid),
        cfg=self.config, max_new_tokens=int(max_new_tokens))
    return trim_at_eos(np.asarray(out)[:len(prompts)])


def pad_prompts(prompts, batch: int, buckets: Sequence[int] = PROMPT_BUCKETS):
  """Token lists -> (tokens int32 [batch, T], lengths int32 [batch], valid bool [batch]); T from buckets."""
  if not prompts or min(len(p) for p in prompts) == 0:
    raise ValueError("every prompt needs at least one token (BOS)")
  t = _bucket(max(len(p) for p in prompts), buckets)
  tokens = np.zeros((batch, t), np.int32)
  lengths = np.ones((batch,), np.int32)
  valid = np.zeros((batch,), bool)
  for i, p in enumerate(prompts):
    tokens[i, :len(p)] = p
    lengths[i] = len(p)
    valid[i] = True
  return tokens, lengths, valid


def trim_at_eos(tokens: np.ndarray) -> list[list[int]]:
  """int [B, N] -> lists cut after the first EOS (kept)."""
  rows = []
  for row in tokens.tolist():
    rows.append(row[:row.index(EOS) + 1] if EOS in row else row)
  return rows


def from_params(cfg: PaliGemmaConfig, flat_params: dict[str, Any], dtype="float32", mesh=None,
                info=None) -> PaliGemma:
  """Builds a model from flat big_vision-named arrays (placing each on its sharding)."""
  placed = {name: _put(name, value, jnp.dtype(dtype), mesh) for name, value in flat_params.items()}
  return PaliGemma(cfg, unflatten(placed), mesh, info)


def load(uri: str, dtype: str = "bfloat16", mesh=None, variant: str | None = None,
         **config_overrides) -> PaliGemma:
  """Loads a checkpoint from any fsspec URL: big_vision .npz (`.b16.npz`, `.f16.npz`, split `.npz.partNN`) or a
  Hugging Face safetensors directory (single file or sharded with an index).

  Names and shapes are checked first (MissingKeyError / UnexpectedKeyError / ShapeMismatchError, before anything
  is placed); then each tensor is read, cast to `dtype` while reading and placed on its NamedSharding over `mesh`
  (or the default device), one at a time, so host memory holds about one tensor. `variant` overrides (and is
  checked against) the architecture inferred from the shapes; `config_overrides` replace decoder fields (e.g.
  final_logits_softcap=0.0). The result's `.info` has the checkpoint URI and digest (provenance).
  """
  from pgbatch import checkpoints
  with checkpoints.open_checkpoint(uri, variant=variant) as ckpt:
    try:
      cfg = ckpt.config.replace(**config_overrides) if config_overrides else ckpt.config
    except TypeError:
      known = ", ".join(f.name for f in dataclasses.fields(configs.TextConfig))
      raise ValueError(f"unknown config override(s) {sorted(config_overrides)}; known: {known}") from None
    ckpt.check(cfg)
    placed = dict(checkpoints.place(ckpt, dtype, mesh))
  return PaliGemma(cfg, unflatten(placed), mesh, ckpt.info)
