"""`pgbatch bench`: engine-only throughput with random weights, or the whole pipeline (`--pipeline`).

Prints one JSON object per batch size: images/s, prefill seconds, per-step decode seconds, model FLOPs per
image, MFU against a matmul peak measured on the same device, peak device memory, compile seconds, device.
A fixed number of new tokens is generated (EOS ignored), as in the transformers reference runs.
"""
from __future__ import annotations

import json
import resource
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from pgbatch.model import PaliGemma, configs, pad_prompts, paligemma, unflatten
from pgbatch.model.configs import PaliGemmaConfig
from pgbatch.model.sharding import make_mesh, param_sharding


def random_model(cfg: PaliGemmaConfig, dtype="bfloat16", mesh=None, seed: int = 0) -> PaliGemma:
  """Random weights generated on the device(s), tensor by tensor, already sharded (no host copy)."""
  params = {}
  key = jax.random.PRNGKey(seed)
  for i, (name, shape) in enumerate(configs.param_shapes(cfg).items()):
    std = 0.1 if name.endswith(("scale", "bias")) else (shape[-2] if len(shape) > 1 else shape[-1]) ** -0.5
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


def bench_pipeline(variant: str, images: int, batch: int, workdir: str | None = None, dtype: str = "bfloat16",
                   new_tokens: int = 20, repeats: int = 3) -> dict:
  """The whole Ray pipeline (WebDataset shards on local disk → decode → annotate → safety → Parquet) on a
  random-weight checkpoint of `variant`, then the engine alone on the same batch size in this process.

  Returns images/s of both and their ratio. The pipeline figure is wall-clock over the whole run, so it
  includes Ray start, model load and compilation: use enough images for those to amortize.
  """
  import pathlib
  import tempfile

  import ray
  import yaml

  from pgbatch import checkpoints, config, demo, pipeline, tokenizer
  from pgbatch.model import random_params

  root = pathlib.Path(workdir or tempfile.mkdtemp(prefix="pgbatch-bench-")).resolve()
  ckpt, tok = root / "model" / f"{variant}-RANDOM-WEIGHTS.npz", root / "model" / "test_tokenizer.model"
  ckpt.parent.mkdir(parents=True, exist_ok=True)
  if not ckpt.exists():
    checkpoints.write_npz(random_params(variant, seed=0), str(ckpt))
  if not tok.exists():
    tokenizer.build_test_tokenizer(str(tok))
  photos = [s for s in demo.samples() if s[0] != "broken"]
  rows = [(f"{photos[i % len(photos)][0]}-{i:07d}", *photos[i % len(photos)][1:]) for i in range(images)]
  shard_dir = root / f"shards-{images}"
  if not shard_dir.exists():
    demo.write_shards(shard_dir, rows, shards=max(1, images // (4 * batch)))
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
  pipeline_ips = summary.images / summary.seconds
  cfg = configs.get(variant)
  engine = bench_engine(random_model(cfg, dtype), batch, new_tokens, [2, 6000, 7000, 108], repeats)
  return dict(variant=variant, images=summary.images, batch=batch, new_tokens=new_tokens, dtype=dtype,
              pipeline_seconds=round(summary.seconds, 2), pipeline_images_per_s=round(pipeline_ips, 2),
              engine_images_per_s=engine["images_per_s"],
              pipeline_over_engine=round(pipeline_ips / engine["images_per_s"], 3),
              status=dict(ok=summary.ok, error=summary.error, filtered=summary.filtered),
              output=str(out), device=engine["device"])


def register_bench(parser) -> None:
  parser.add_argument("--variant", default="tiny-pg1", help="model variant (pgbatch models)")
  parser.add_argument("--batch", default="1,8,32", help="comma-separated batch sizes to sweep")
  parser.add_argument("--new-tokens", type=int, default=20)
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--mesh", default=None, help="DATAxMODEL over the local devices, e.g. 1x8; default one device")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--pipeline", action="store_true", help="time the whole Ray pipeline instead")
  parser.add_argument("--images", type=int, default=256, help="--pipeline: images to annotate")
  parser.add_argument("--workdir", default=None, help="--pipeline: where shards and output go")


def main_bench(args) -> int:
  if args.pipeline:
    print(json.dumps(bench_pipeline(args.variant, args.images, int(args.batch.split(",")[-1]), args.workdir,
                                    args.dtype, args.new_tokens, args.repeats)))
    return 0
  cfg = configs.get(args.variant)
  mesh = make_mesh(*map(int, args.mesh.lower().split("x"))) if args.mesh else None
  model = random_model(cfg, args.dtype, mesh)
  peak = matmul_peak(args.dtype)
  prompt = [2, 6000, 7000, 108]  # BOS "caption en" "\n"-sized prompt
  for batch in (int(b) for b in args.batch.split(",")):
    batch = max(batch, model.data_parallelism)
    print(json.dumps(bench_engine(model, batch, args.new_tokens, prompt, args.repeats, peak)), flush=True)
  return 0


if __name__ == "__main__":
  from pgbatch.cli import main
  sys.exit(main(["bench", *sys.argv[1:]]))
