"""`pgbatch bench`: engine-only throughput with random weights, or the whole pipeline (`--pipeline`).

Prints one JSON object per batch size: images/s, prefill seconds, per-step decode seconds, model FLOPs per
image, MFU against a matmul peak measured on the same device, peak device memory, compile seconds, device.
A fixed number of new tokens is generated (EOS ignored), as in the transformers reference runs.
"""
from __future__ import annotations

import math
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np

from pgbatch.model import PaliGemma, configs, pad_prompts, paligemma, unflatten
from pgbatch.model.configs import PaliGemmaConfig
from pgbatch.model.random_weights import init_std, random_tensors
from pgbatch.model.sharding import param_sharding


def random_model(cfg: PaliGemmaConfig, dtype="bfloat16", mesh=None, seed: int = 0) -> PaliGemma:
  """Random weights generated on the device(s), tensor by tensor, already sharded (no host copy): the scales of
  `random_weights.init_std`, drawn by jax.random on the device (numpy on the host takes minutes at 28B)."""
  params = {}
  key = jax.random.PRNGKey(seed)
  for i, (name, shape) in enumerate(configs.param_shapes(cfg).items()):
    std = init_std(name, shape)
    out_sharding = param_sharding(name, shape, mesh) if mesh is not None else None
    make = jax.jit(lambda k, s=shape, d=std: (jax.random.normal(k, s, jnp.float32) * d).astype(dtype),
                   out_shardings=out_sharding)
    params[name] = make(jax.random.fold_in(key, i))
  return PaliGemma(cfg, unflatten(params), mesh)


def flops_per_image(cfg: PaliGemmaConfig, prompt_len: int, new_tokens: int) -> float:
  """Model FLOPs (2 per multiply-add) for one image: SigLIP, prefill of P + prompt, greedy decode."""
  v, t = cfg.vision, cfg.text
  p = cfg.num_image_tokens
  vit_layer = 4 * v.width * v.width + 2 * v.width * v.mlp_dim
  vit = 2 * p * (v.depth * vit_layer + 3 * v.patch_size ** 2 * v.width + v.width * t.width)
  vit += v.depth * 4 * p * p * v.width                                  # QK^T and PV
  attn_proj = t.width * t.head_dim * (2 * t.num_heads + 2 * t.num_kv_heads)
  llm_layer = attn_proj + 3 * t.width * t.mlp_dim
  s = p + prompt_len
  prefill = 2 * s * t.depth * llm_layer + t.depth * 4 * s * s * t.num_heads * t.head_dim
  prefill += 2 * t.width * t.vocab_size                                 # logits of the last position
  decode = 0.0
  for j in range(1, new_tokens):
    decode += 2 * t.depth * llm_layer + t.depth * 4 * (s + j) * t.num_heads * t.head_dim
    decode += 2 * t.width * t.vocab_size
  return float(vit + prefill + decode)


def matmul_peak(dtype="bfloat16", n: int | None = None) -> float:
  """Measured dense matmul FLOP/s on the default device (best of a few runs)."""
  on_cpu = jax.devices()[0].platform == "cpu"
  n = n or (1024 if on_cpu else 8192)
  dtype = jnp.float32 if on_cpu else jnp.dtype(dtype)
  a = jnp.ones((n, n), dtype)
  f = jax.jit(lambda a: a @ a)
  f(a).block_until_ready()
  best = float("inf")
  for _ in range(5):
    t = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2 * n ** 3 / best


def peak_memory_bytes() -> tuple[int, str]:
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    return int(stats["peak_bytes_in_use"]), "device"
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "host_rss"


def _timed(fn, repeats: int) -> float:
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    best = min(best, time.perf_counter() - t)
  return best


def bench_engine(model: PaliGemma, batch: int, new_tokens: int, prompt: list[int], repeats: int = 3,
                 peak: float | None = None) -> dict:
  """Times encode + prefill + `new_tokens` greedy steps for one batch of random images."""
  cfg = model.config
  rng = np.random.default_rng(0)
  images = model.put_batch(rng.integers(0, 256, (batch, cfg.image_size, cfg.image_size, 3), np.uint8))
  tokens, lengths, valid = (model.put_batch(a) for a in pad_prompts([prompt] * batch, batch))
  from pgbatch.engine import _encode_uint8

  def run(n):
    zimg = _encode_uint8(model.params, images, cfg=cfg)
    return paligemma.generate_tokens(model.params, zimg, tokens, lengths, valid, cfg=cfg,
                                     max_new_tokens=n, stop_at_eos=False)

  t = time.perf_counter()
  jax.block_until_ready(run(new_tokens))
  jax.block_until_ready(run(1))
  compile_s = time.perf_counter() - t
  full = _timed(lambda: run(new_tokens), repeats)
  prefill = _timed(lambda: run(1), repeats)
  flops = flops_per_image(cfg, len(prompt), new_tokens)
  mem, mem_kind = peak_memory_bytes()
  ips = batch / full
  return dict(variant=cfg.name, batch=batch, new_tokens=new_tokens, dtype=str(model.dtype),
              images_per_s=round(ips, 2), batch_seconds=round(full, 4),
              prefill_seconds=round(prefill, 4),
              decode_step_seconds=round((full - prefill) / max(new_tokens - 1, 1), 5),
              flops_per_image=flops, mfu=round(flops * ips / peak, 4) if peak else None,
              matmul_peak_flops=peak, peak_memory_bytes=mem, peak_memory_kind=mem_kind,
              compile_seconds=round(compile_s, 2), device=jax.devices()[0].device_kind,
              num_devices=jax.device_count(), mesh=dict(model.mesh.shape) if model.mesh else None)


def default_accelerator() -> str:
  return {"gpu": "gpu", "cuda": "gpu", "tpu": "tpu"}.get(jax.default_backend(), "cpu")


def steady_rate(entries: list[dict]) -> float | None:
  """Images/s between the first and the last shard commit (manifest `committed_at`, `rows`): the pipeline's
  rate once Ray, the model and its compiled programs are up. None with fewer than two committed shards."""
  import datetime
  done = sorted((datetime.datetime.fromisoformat(e["committed_at"]), int(e["rows"])) for e in entries)
  if len(done) < 2 or done[-1][0] <= done[0][0]:
    return None
  return sum(rows for _, rows in done[1:]) / (done[-1][0] - done[0][0]).total_seconds()


def bench_pipeline(variant: str, images: int, batch: int, workdir: str | None = None, dtype: str = "bfloat16",
                   new_tokens: int = 20, repeats: int = 3) -> dict:
  """The whole Ray pipeline (WebDataset shards on local disk → decode → annotate → safety → Parquet) on a
  random-weight checkpoint of `variant`, then the engine alone on the same batch size in this process.

  Returns images/s of both and their ratios. `pipeline_images_per_s` is wall-clock over the whole run (Ray
  start, model load and compilation included); `pipeline_steady_images_per_s` counts from the first shard
  commit to the last (`steady_rate`), which is what a long job sees. `compiles_warm_up` / `compiles_mid_job`:
  the annotate actor's XLA compiles during its warm-up and after it (0 when every batch bucket was warmed up).
  """
  import pathlib
  import tempfile

  import ray
  import yaml

  from pgbatch import config, demo, pipeline

  root = pathlib.Path(workdir or tempfile.mkdtemp(prefix="pgbatch-bench-")).resolve()
  ckpt, tok = demo.write_model(root / "model", variant)
  photos = [s for s in demo.samples() if s[0] != demo.BROKEN_KEY]
  rows = [(f"{photos[i % len(photos)][0]}-{i:07d}", *photos[i % len(photos)][1:]) for i in range(images)]
  shard_dir = root / f"shards-{images}"
  if not shard_dir.exists():
    demo.write_shards(shard_dir, rows, shards=max(min(2, images), images // (4 * batch)))
  out = pathlib.Path(tempfile.mkdtemp(prefix="out-", dir=root))
  spec_dict = {
      "name": f"bench-{variant}", "input": {"uri": str(shard_dir / "*.tar"), "format": "webdataset"},
      "output": {"uri": str(out) + "/"},
      "model": {"checkpoint": str(ckpt), "tokenizer": str(tok), "variant": variant, "dtype": dtype},
      "tasks": [{"name": "caption_en", "kind": "caption", "lang": "en", "max_new_tokens": new_tokens}],
      "resources": {"accelerator": default_accelerator(), "actors": 1, "chips_per_actor": 1,
                    "batch_size": batch},
  }
  (root / "job.yaml").write_text(yaml.safe_dump(spec_dict, sort_keys=False))
  spec = config.load(str(root / "job.yaml"), environ={})
  summary = pipeline.run(spec, progress=False)
  ray.shutdown()  # frees the actor's device memory before the engine-only run
  pipeline_ips = round(summary.images / summary.seconds, 2)  # the ratio below uses the printed figure
  from pgbatch.io.sink import read_manifest
  steady = steady_rate(read_manifest(str(out) + "/"))
  cfg = configs.get(variant)
  engine = bench_engine(random_model(cfg, dtype), batch, new_tokens, [2, 6000, 7000, 108], repeats)
  return dict(variant=variant, images=summary.images, batch=batch, new_tokens=new_tokens, dtype=dtype,
              pipeline_seconds=round(summary.seconds, 2), pipeline_images_per_s=pipeline_ips,
              engine_images_per_s=engine["images_per_s"],
              pipeline_over_engine=round(pipeline_ips / engine["images_per_s"], 3),
              pipeline_steady_images_per_s=None if steady is None else round(steady, 2),
              steady_over_engine=None if steady is None else round(steady / engine["images_per_s"], 3),
              status=dict(ok=summary.ok, error=summary.error, filtered=summary.filtered),
              compiles_warm_up=summary.compiles["warm_up"], compiles_mid_job=summary.compiles["mid_job"],
              output=str(out), device=engine["device"])


# ---------------------------------------------------------------------------------------------------------------
# `pgbatch bench --load`: checkpoint loading speed and host memory.


def synthetic_config(target_bytes: float, itemsize: int) -> PaliGemmaConfig:
  """A PaliGemma-shaped config of about `target_bytes` (real 257152-row vocabulary; So400m vision and a
  gemma_2b-wide decoder from 0.75B parameters on, narrower below), with as many decoder layers as fit."""
  big = target_bytes / itemsize >= 0.75e9
  vision = configs.VisionConfig() if big else configs.VisionConfig(width=256, depth=4, mlp_dim=1024, num_heads=4)
  width = 2048 if big else max(64, min(2048, int(target_bytes / 2 / (configs.VOCAB_SIZE * itemsize)) // 64 * 64))
  heads = max(1, width // 256)
  text = lambda depth: configs.TextConfig(width=width, depth=depth, mlp_dim=8 * width, num_heads=heads,
                                          num_kv_heads=1, head_dim=256, query_scale=256 ** -0.5)
  cfg = lambda depth: configs.PaliGemmaConfig(f"synthetic-{target_bytes / 1e9:g}gb", vision, text(depth), 224)
  fixed = configs.num_params(cfg(0)) * itemsize
  per_layer = configs.num_params(cfg(1)) * itemsize - fixed
  return cfg(max(1, round((target_bytes - fixed) / per_layer)))


def write_random_checkpoint(uri: str, cfg: PaliGemmaConfig, fmt: str = "npz", dtype="bfloat16") -> None:
  """Random weights for `cfg` written tensor by tensor as a big_vision .npz or a HF directory."""
  from pgbatch import checkpoints
  dtype = np.dtype(jnp.dtype(dtype))
  if fmt == "npz":
    checkpoints.write_npz_stream(random_tensors(cfg, dtype=dtype), uri)
  else:
    shapes = {k: (s, dtype) for k, s in configs.param_shapes(cfg).items()}
    checkpoints.write_hf_stream(random_tensors(cfg, dtype=dtype), shapes, cfg, uri,
                                 max_shard_bytes=2 << 30)


class _RssPeak:
  """Peak resident set size of this process while the block runs: VmHWM after resetting it (Linux), else
  sampled every millisecond from /proc/self/statm, else getrusage (lifetime peak)."""

  def __enter__(self):
    import threading
    self.before = _rss()
    self.method = "VmHWM"
    try:
      with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    except OSError:
      self.method = "sampled" if self.before else "ru_maxrss"
    self.sampled = self.before
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._sample, daemon=True)
    if self.method == "sampled":
      self._thread.start()
    return self

  def _sample(self):
    while not self._stop.wait(0.001):
      self.sampled = max(self.sampled, _rss())

  def __exit__(self, *_):
    self._stop.set()
    if self._thread.is_alive():
      self._thread.join()
    self.after = _rss()
    if self.method == "VmHWM":
      self.peak = max(_status_kb("VmHWM") * 1024, self.sampled)
    elif self.method == "sampled":
      self.peak = self.sampled
    else:
      self.peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _status_kb(field: str) -> int:
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith(field + ":"):
          return int(line.split()[1])
  except OSError:
    pass
  return 0


def _rss() -> int:
  return _status_kb("VmRSS") * 1024


def bench_load(uri: str, dtype: str = "bfloat16", mesh=None, fixed_overhead: int = 256 << 20) -> dict:
  """Loads `uri` onto the device(s) (`pgbatch.model.load`) and reports time, throughput and host memory.

  `host_transient_bytes` is the peak RSS during the load minus the RSS before, minus what stays resident
  (on CPU the placed parameters live in host memory). Streaming keeps it within the largest tensor (in the
  target dtype) plus a fixed overhead (`fixed_overhead`: read chunks, fsspec blocks, allocator slack).
  """
  import gc

  import pgbatch.model
  from pgbatch import checkpoints
  jax.devices()  # backend start-up (seconds on TPU) is not part of loading
  gc.collect()
  t0 = time.perf_counter()
  with checkpoints.open_checkpoint(uri) as ck:
    open_s = time.perf_counter() - t0
    shapes = ck.names_and_shapes()
    files = sum(size for _, size in ck.info.files)
    fmt, stored = ck.info.format, sorted({str(d) for _, d in shapes.values()})
  target = np.dtype(jnp.dtype(dtype))
  largest = max(math.prod(s) for s, _ in shapes.values())
  with _RssPeak() as rss:
    t0 = time.perf_counter()
    model = pgbatch.model.load(uri, dtype=dtype, mesh=mesh)
    jax.block_until_ready(model.params)
    seconds = time.perf_counter() - t0
  leaves = jax.tree_util.tree_leaves(model.params)
  placed = sum(x.nbytes for x in leaves)
  resident = max(rss.after - rss.before, 0)
  transient = rss.peak - rss.before - resident
  bound = largest * target.itemsize + fixed_overhead
  return dict(mode="load", uri=uri, format=fmt, variant=model.config.name, stored_dtype=",".join(stored),
              dtype=str(target), tensors=len(leaves), file_bytes=files, params_bytes=placed,
              largest_tensor_bytes=largest * target.itemsize, open_seconds=round(open_s, 3),
              load_seconds=round(seconds, 3), mb_per_s=round(files / 1e6 / seconds, 1),
              rss_before_bytes=rss.before, peak_rss_bytes=rss.peak, rss_after_bytes=rss.after,
              host_transient_bytes=transient, transient_bound_bytes=bound, within_bound=bool(transient <= bound),
              rss_method=rss.method, digest=model.info.digest, device=jax.devices()[0].device_kind,
              num_devices=jax.device_count(), mesh=dict(mesh.shape) if mesh is not None else None)
