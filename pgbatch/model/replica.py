"""A PaliGemma replica: params (a nested dict in big_vision's layout) on one device or a ("data", "model") mesh.

    m.logits(images, tokens, prefix_len)        # float32 [B, T, V]
    m.generate(images, prompts, max_new_tokens) # list of new-token lists, ending at EOS if emitted
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pgbatch.model import paligemma, sharding
from pgbatch.model.configs import PaliGemmaConfig

EOS = paligemma.EOS
PROMPT_BUCKETS = (8, 16, 32, 64, 128, 256, 512)


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
  adapters: tuple = ()  # pgbatch.adapters.AdapterInfo of each adapter merged into the weights

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
    """Places a batch-leading array: sharded over "data" on a mesh (device_put compiles nothing)."""
    if self.mesh is None:
      return jax.device_put(array)
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
