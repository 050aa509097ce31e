"""`pgbatch bench`: engine throughput (random weights), the whole pipeline (--pipeline), checkpoint loading
(--load), the cost model of the compiled programs (--cost, no accelerator) or shard commits against a slow
object store (--commits); JSON per measurement."""
from __future__ import annotations

import json
import sys
import time

HELP = "engine or pipeline throughput benchmark"


def register(parser) -> None:
  parser.add_argument("--variant", default="tiny-pg1", help="model variant (pgbatch models); --cost: comma-separated")
  parser.add_argument("--batch", default="1,8,32", help="comma-separated batch sizes to sweep")
  parser.add_argument("--new-tokens", type=int, default=20)
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--mesh", default=None, help="DATAxMODEL over the local devices, e.g. 1x8; default one device")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--pipeline", action="store_true", help="time the whole Ray pipeline instead")
  parser.add_argument("--cost", action="store_true", help="compile the real programs from abstract shapes (no "
                      "weights, no accelerator): FLOPs, bytes, memory, cache copies, roofline img/s per device")
  parser.add_argument("--target", default="cpu", help="--cost: comma-separated cpu, tpu-v5e-1, tpu-v5e-4, "
                      "tpu-v5e-8 (TPU targets need the libtpu wheel: pip install 'pgbatch[tpu-cost]')")
  parser.add_argument("--prompt-len", type=int, default=4, help="--cost: prompt tokens (bucketed as in a job)")
  parser.add_argument("--in-flight", type=int, default=1, help="--cost: batches in flight per replica "
                      "(resources.concurrent_batches) for the memory figure")
  parser.add_argument("--images", type=int, default=256, help="--pipeline: images to annotate")
  parser.add_argument("--workdir", default=None, help="--pipeline: where shards and output go; --load: where the "
                      "random checkpoint is written (kept and reused), default a temporary directory")
  parser.add_argument("--load", nargs="?", const="", default=None, metavar="URI",
                      help="time loading a checkpoint (any fsspec URL) onto the device(s): seconds, MB/s, peak host "
                      "RSS; without URI a random checkpoint of --load-gb is written first")
  parser.add_argument("--load-gb", type=float, default=2.0, help="--load: size of the random checkpoint (GB)")
  parser.add_argument("--load-format", choices=("npz", "hf"), default="npz",
                      help="--load: format of the random checkpoint (big_vision .npz or HF safetensors)")
  parser.add_argument("--stored-dtype", default="bfloat16", help="--load: dtype of the random checkpoint's tensors")
  from pgbatch import commit_bench   # standard library only at import time
  commit_bench.add_args(parser)


def main(args) -> int:
  if args.commits:
    from pgbatch import commit_bench
    return commit_bench.main(args)
  from pgbatch import bench
  from pgbatch.model import configs, make_mesh
  if args.load is not None:
    return _main_load(args)
  if args.cost:
    from pgbatch.costmodel import main_cost
    return main_cost(args)
  if args.pipeline:
    print(json.dumps(bench.bench_pipeline(args.variant, args.images, int(args.batch.split(",")[-1]), args.workdir,
                                    args.dtype, args.new_tokens, args.repeats)))
    return 0
  cfg = configs.get(args.variant)
  mesh = make_mesh(*map(int, args.mesh.lower().split("x"))) if args.mesh else None
  model = bench.random_model(cfg, args.dtype, mesh)
  peak = bench.matmul_peak(args.dtype)
  prompt = [2, 6000, 7000, 108]  # BOS "caption en" "\n"-sized prompt
  for batch in (int(b) for b in args.batch.split(",")):
    batch = max(batch, model.data_parallelism)
    print(json.dumps(bench.bench_engine(model, batch, args.new_tokens, prompt, args.repeats, peak)), flush=True)
  return 0


def _main_load(args) -> int:
  """`--load`: checkpoint loading speed and host memory."""
  import pathlib
  import shutil
  import tempfile

  import jax.numpy as jnp
  import numpy as np

  from pgbatch import bench, checkpoints
  from pgbatch.model import configs, make_mesh
  mesh = make_mesh(*map(int, args.mesh.lower().split("x"))) if args.mesh else None
  uri, tmp = args.load, None
  if not uri:
    stored = np.dtype(jnp.dtype(args.stored_dtype))
    cfg = bench.synthetic_config(args.load_gb * 1e9, stored.itemsize)
    root = pathlib.Path(args.workdir) if args.workdir else pathlib.Path(tempfile.mkdtemp(prefix="pgbatch-load-"))
    tmp = None if args.workdir else root
    name = f"{cfg.name}-{stored}" + (".npz" if args.load_format == "npz" else "-hf")
    uri = str(root / name)
    if not (root / name).exists():
      root.mkdir(parents=True, exist_ok=True)
      t0 = time.perf_counter()
      bench.write_random_checkpoint(uri, cfg, args.load_format, stored)
      print(f"wrote {uri} ({configs.num_params(cfg) * stored.itemsize / 1e9:.2f} GB) in "
            f"{time.perf_counter() - t0:.1f}s", file=sys.stderr)
  try:
    for _ in range(max(1, args.repeats)):
      print(json.dumps(bench.bench_load(uri, args.dtype, mesh)), flush=True)
  except checkpoints.CheckpointError as e:
    print(f"pgbatch bench: {e}", file=sys.stderr)
    return 1
  finally:
    if tmp is not None:
      shutil.rmtree(tmp, ignore_errors=True)
  return 0
