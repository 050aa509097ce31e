"""`pgbatch convert SRC DST`: stream a checkpoint into another format one tensor at a time."""
from __future__ import annotations

import math
import sys
import time

HELP = "convert big_vision .npz <-> Hugging Face safetensors"


def register(parser) -> None:
  parser.add_argument("src", help="checkpoint URL: big_vision .npz (or .npz.partNN) or a HF directory")
  parser.add_argument("dst", help="destination URL: ends with .npz → big_vision, otherwise a HF directory")
  parser.add_argument("--variant", default=None, help="registered variant to check the source against")
  parser.add_argument("--max-shard-bytes", type=int, default=None, help="HF output: shard above this size")


def main(args) -> int:
  """Streams SRC into DST one tensor at a time."""
  from pgbatch.checkpoints import CheckpointError, open_checkpoint, write_hf_stream, write_npz_stream
  t0 = time.perf_counter()
  try:
    ck = open_checkpoint(args.src, args.variant)
    ck.check(ck.config)
    shapes = ck.names_and_shapes()
    nbytes = sum(math.prod(s) * d.itemsize for s, d in shapes.values())
    if args.dst.rstrip("/").endswith(".npz"):
      write_npz_stream(ck.tensors(), args.dst)
    else:
      write_hf_stream(ck.tensors(), shapes, ck.config, args.dst, args.max_shard_bytes)
  except CheckpointError as e:
    print(f"pgbatch convert: {e}", file=sys.stderr)
    return 2  # a bad input checkpoint (pgbatch.errors)
  print(f"converted {args.src} ({ck.info.format}, {ck.config.name}, {len(shapes)} tensors, {nbytes / 1e9:.2f} GB) "
        f"→ {args.dst} in {time.perf_counter() - t0:.1f}s")
  return 0
