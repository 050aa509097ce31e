"""The accelerator program: one PaliGemma replica annotating batches of images for several prompts.

Knows nothing of Ray. Shapes are static under jit: the batch is padded to a bucket (powers of two up to
`batch_size`, multiples of the mesh's data axis) and prompts to a length bucket, so a long job compiles a
handful of programs. Each image is encoded by SigLIP once and its tokens reused by every task.
"""
from __future__ import annotations

import functools
import threading
import time
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pgbatch.model import PROMPT_BUCKETS, PaliGemma, paligemma, pad_prompts, trim_at_eos
from pgbatch.model.sharding import make_mesh, round_up  # noqa: F401  (make_mesh re-exported)


@functools.partial(jax.jit, static_argnames="cfg")
def _encode_uint8(params, images, cfg):
  """uint8 [B, R, R, 3] -> image tokens [B, P, D]; the [-1, 1] scaling happens on the device."""
  x = images.astype(jnp.float32) * (2.0 / 255.0) - 1.0
  return paligemma.encode_images(params, x, cfg)


def batch_buckets(batch_size: int, multiple: int = 1) -> list[int]:
  """Powers of two below batch_size, then batch_size; each rounded up to `multiple`."""
  sizes, b = set(), 1
  while b < batch_size:
    sizes.add(round_up(b, multiple))
    b *= 2
  sizes.add(round_up(batch_size, multiple))
  return sorted(sizes)


class Engine:
  """Greedy annotation of image batches: `annotate(images, prompts_per_task, max_new_tokens_per_task)`.

  Thread-safe: two threads may annotate at once, so one batch's host work overlaps the other's device time.
  """

  def __init__(self, model: PaliGemma, batch_size: int = 64, prompt_buckets: Sequence[int] = PROMPT_BUCKETS):
    self.model = model
    self.batch_size = batch_size
    self.prompt_buckets = tuple(prompt_buckets)
    self.buckets = batch_buckets(batch_size, model.data_parallelism)
    self.stats = {"batches": 0, "images": 0, "seconds": 0.0}
    self._stats_lock = threading.Lock()  # annotate may run on several threads at once (host/device overlap)

  @property
  def image_size(self) -> int:
    return self.model.config.image_size

  def _bucket(self, n: int) -> int:
    return next(b for b in self.buckets if b >= n)

  def annotate(self, images: np.ndarray, prompts: Mapping[str, Sequence[Sequence[int]]],
               max_new_tokens: Mapping[str, int]) -> dict[str, list[list[int]]]:
    """images uint8 [B, R, R, 3]; prompts[task] = B token lists (BOS … "\n"); returns new tokens per task
    and row, each ending with EOS when the model emitted it."""
    b = len(images)
    if b > self.batch_size:
      return self._annotate_in_chunks(images, prompts, max_new_tokens)
    start = time.perf_counter()
    padded = self._bucket(b)
    batch = np.zeros((padded, *images.shape[1:]), np.uint8)
    batch[:b] = images
    zimg = _encode_uint8(self.model.params, self.model.put_batch(batch), cfg=self.model.config)
    pending = {}
    for task, task_prompts in prompts.items():  # dispatch every task before waiting on any
      if len(task_prompts) != b:
        raise ValueError(f"task {task!r}: {len(task_prompts)} prompts for {b} images")
      tokens, lengths, valid = pad_prompts(task_prompts, padded, self.prompt_buckets)
      pending[task] = paligemma.generate_tokens(
          self.model.params, zimg, self.model.put_batch(tokens), self.model.put_batch(lengths),
          self.model.put_batch(valid), cfg=self.model.config, max_new_tokens=int(max_new_tokens[task]))
    out = {task: trim_at_eos(np.asarray(tokens)[:b]) for task, (tokens, _) in pending.items()}
    with self._stats_lock:
      self.stats["batches"] += 1
      self.stats["images"] += b
      self.stats["seconds"] += time.perf_counter() - start
    return out

  def _annotate_in_chunks(self, images, prompts, max_new_tokens):
    out: dict[str, list[list[int]]] = {task: [] for task in prompts}
    for i in range(0, len(images), self.batch_size):
      part = self.annotate(images[i:i + self.batch_size],
                           {t: p[i:i + self.batch_size] for t, p in prompts.items()}, max_new_tokens)
      for task, rows in part.items():
        out[task].extend(rows)
    return out
