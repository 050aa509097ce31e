"""The accelerator program: one PaliGemma replica annotating batches of images for several prompts.

Knows nothing of Ray. Shapes are static under jit: the batch is padded to a bucket (`batch_buckets`: multiples
of 32 and of the mesh's data axis up to `batch_size`) and prompts to a length bucket. `warm_up` compiles every
bucket's programs (SigLIP, then one prefill + decode program per task) before the job, without decoding, so
a partial batch compiles nothing mid-job; every XLA compile of the process is counted (`pgbatch.compiles`) and
one after warm-up is logged as a warning. Each image is encoded by SigLIP once and its tokens reused by every task.
"""
from __future__ import annotations

import functools
import logging
import math
import threading
import time
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pgbatch import compiles
from pgbatch.model import PROMPT_BUCKETS, PaliGemma, paligemma, pad_prompts, trim_at_eos
from pgbatch.model.sharding import make_mesh, round_up  # noqa: F401  (make_mesh re-exported)

log = logging.getLogger(__name__)
BUCKET_STEP = 32      # a partial batch is padded by fewer than this many rows (times the data axis, if larger)
MAX_BUCKETS = 8       # at most this many batch sizes are compiled: the step grows for very large batches


@functools.partial(jax.jit, static_argnames="cfg")
def _encode_uint8(params, images, cfg):
  """uint8 [B, R, R, 3] -> image tokens [B, P, D]; the [-1, 1] scaling happens on the device."""
  x = images.astype(jnp.float32) * (2.0 / 255.0) - 1.0
  return paligemma.encode_images(params, x, cfg)


def batch_buckets(batch_size: int, multiple: int = 1, step: int = BUCKET_STEP,
                  max_buckets: int = MAX_BUCKETS) -> list[int]:
  """The padded batch sizes: multiples of lcm(step, multiple) below batch_size, then batch_size rounded up to
  `multiple`. The step grows (in whole units) so that there are at most `max_buckets` sizes; a batch of n rows
  runs at the first size >= n, so it wastes fewer than one step of rows (e.g. 256: 32, 64, …, 256)."""
  top = round_up(batch_size, multiple)
  unit = math.lcm(step, multiple)
  unit = round_up(-(-top // max_buckets), unit)
  return sorted(set(range(unit, top, unit)) | {top})


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
    self.programs: dict[tuple, jax.stages.Compiled] = {}  # ("encode", B) / ("generate", B, T, N) -> program
    compiles.install()
    self._compiles_base = compiles.count()   # compiles of this process before this engine existed
    self._warm_up_compiles = 0
    self._warmed = False
    self._mid_job_logged = 0
    self._reported = (0, 0)                  # (warm-up, mid-job) counts handed out by take_compile_counts

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
    self._log_mid_job_compiles(b, padded)
    return out

  # -- warm-up and compile counting -----------------------------------------------------------------------------

  def warm_up(self, prompts: Mapping[str, Sequence[int]], max_new_tokens: Mapping[str, int]) -> int:
    """Compiles the programs of every batch bucket (largest first; only SigLIP runs, on zeros): SigLIP, and one
    prefill + decode program per task for the prompt-length bucket of `prompts[task]` (one representative
    prompt's ids). Returns the number of XLA compiles it took (counted, also in `compile_counts`)."""
    start, before = time.perf_counter(), compiles.count()
    cfg, params = self.model.config, self.model.params
    for b in sorted(self.buckets, reverse=True):
      images = self.model.put_batch(np.zeros((b, self.image_size, self.image_size, 3), np.uint8))
      self.programs[("encode", b)] = _encode_uint8.lower(params, images, cfg=cfg).compile()
      # SigLIP runs once per bucket: the decoder programs are lowered against a real image-token array, so their
      # argument placement is exactly what `annotate` passes (an abstract one can differ in committedness).
      zimg = _encode_uint8(params, images, cfg=cfg)
      for task, prompt in prompts.items():
        tokens, lengths, valid = (self.model.put_batch(a) for a in pad_prompts([prompt], b, self.prompt_buckets))
        n = int(max_new_tokens[task])
        self.programs[("generate", b, tokens.shape[1], n)] = paligemma.generate_tokens.lower(
            params, zimg, tokens, lengths, valid, cfg=cfg, max_new_tokens=n).compile()
      del zimg
    self._warm_up_compiles += compiles.count() - before
    self._warmed = True
    log.info("warm-up: %d XLA compiles in %.1f s (batch buckets %s, %d task program(s) each)",
             compiles.count() - before, time.perf_counter() - start, self.buckets, len(prompts))
    return compiles.count() - before

  def compile_counts(self) -> dict[str, int]:
    """XLA compiles of this process since the engine was made: {"warm_up": …, "mid_job": …} (mid-job: any
    other compile, e.g. a prompt longer than the warmed-up bucket, or a failing batch halved)."""
    total = compiles.count() - self._compiles_base
    return {"warm_up": self._warm_up_compiles, "mid_job": total - self._warm_up_compiles}

  def take_compile_counts(self) -> tuple[int, int]:
    """(warm-up, mid-job) compiles since the previous call: each compile is handed out once (thread-safe)."""
    with self._stats_lock:
      now = self.compile_counts()
      out = (now["warm_up"] - self._reported[0], now["mid_job"] - self._reported[1])
      self._reported = (now["warm_up"], now["mid_job"])
    return out

  def _log_mid_job_compiles(self, b: int, padded: int) -> None:
    with self._stats_lock:
      seen = self._compiles_base + self._warm_up_compiles + self._mid_job_logged
      new = compiles.since(seen)
      self._mid_job_logged += len(new)
    for name, seconds in new:
      (log.warning if self._warmed else log.debug)("compiled %s mid-job in %.1f s (a batch of %d padded to %d; buckets %s)", name, seconds, b,
                  padded, self.buckets)

  def _annotate_in_chunks(self, images, prompts, max_new_tokens):
    out: dict[str, list[list[int]]] = {task: [] for task in prompts}
    for i in range(0, len(images), self.batch_size):
      part = self.annotate(images[i:i + self.batch_size],
                           {t: p[i:i + self.batch_size] for t, p in prompts.items()}, max_new_tokens)
      for task, rows in part.items():
        out[task].extend(rows)
    return out
