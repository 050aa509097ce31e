"""Writing big_vision params as a Hugging Face PaliGemma directory (config.json + safetensors, sharded with an
index above `max_shard_bytes`), one tensor at a time."""
from __future__ import annotations

import json
import math
import os
import re
from typing import Iterable, Iterator, Mapping, Optional

import numpy as np

from pgbatch.checkpoints.architecture import hf_config_dict, hf_vocab_rows
from pgbatch.checkpoints.checkpoint import Checkpoint, CheckpointInfo
from pgbatch.checkpoints.errors import CheckpointError, UnexpectedKeyError
from pgbatch.checkpoints.hf_mapping import Rule, rules, shape_of
from pgbatch.checkpoints.safetensors_file import write_header
from pgbatch.checkpoints.sources import resolve
from pgbatch.fsutil import is_local
from pgbatch.model import configs


def _hf_tensors(rule: Rule, arr: np.ndarray, cfg) -> Iterator[tuple[str, np.ndarray]]:
  """(HF key, HF array) for one big_vision tensor."""
  if rule.vocab_rows:
    pad = hf_vocab_rows(arr.shape[0]) - arr.shape[0]
    yield rule.hf[0], np.concatenate([arr, np.zeros((pad,) + arr.shape[1:], arr.dtype)])
    return
  for i, layer in (enumerate(arr) if rule.stacked else [(None, arr)]):
    for key, x in zip(rule.hf, rule.to_hf(layer)):
      yield key.format(i=i), np.ascontiguousarray(x)


def _hf_layout(cfg, shapes: Mapping[str, tuple[tuple[int, ...], np.dtype]]):
  """[(bv name, rule, [(HF key, dtype, shape)])] in the order of `shapes`."""
  by_name = {r.bv: r for r in rules(cfg)}
  extra = [k for k in shapes if k not in by_name]
  if extra:
    raise UnexpectedKeyError(f"cannot write HF: no HF name for {', '.join(extra)}")
  out = []
  for name, (shape, dtype) in shapes.items():
    rule = by_name[name]
    if rule.vocab_rows:
      entries = [(rule.hf[0], dtype, (hf_vocab_rows(shape[0]),) + tuple(shape[1:]))]
    else:
      per_layer = shape_of(rule.to_hf, shape[1:] if rule.stacked else shape)
      layers = range(shape[0]) if rule.stacked else [None]
      entries = [(k.format(i=i), dtype, s) for i in layers for k, s in zip(rule.hf, per_layer)]
    out.append((name, rule, entries))
  return out


def write_hf_stream(items: Iterable[tuple[str, np.ndarray]], shapes, cfg, dir_uri: str,
                     max_shard_bytes: Optional[int] = None) -> None:
  """Writes tensors arriving one at a time in the order of `shapes` (name → (shape, dtype)) as HF safetensors."""
  check = Checkpoint(CheckpointInfo(dir_uri, "params", "", ()), cfg, dict(shapes), None)
  check.check(cfg)
  layout = _hf_layout(cfg, shapes)
  flat = [e for _, _, entries in layout for e in entries]
  shards, size = [[]], 0
  for e in flat:  # greedy, in order
    n = math.prod(e[2]) * e[1].itemsize
    if max_shard_bytes and shards[-1] and size + n > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(e)
    size += n
  names = (["model.safetensors"] if len(shards) == 1 else
           [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
  fs, path = resolve(dir_uri)
  if is_local(fs):
    fs.makedirs(path, exist_ok=True)
  dtypes = {str(d) for _, d, _ in flat}
  dtype = "bfloat16" if "bfloat16" in dtypes else ("float16" if "float16" in dtypes else "float32")
  stale = [p for p in (fs.ls(path, detail=False) if fs.exists(path) else [])
           if re.fullmatch(r"model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?", os.path.basename(p))
           and os.path.basename(p) not in names]
  for p in stale:  # weights of an earlier conversion into the same directory would shadow or confuse these
    fs.rm(p)
  fs.pipe_file(f"{path}/config.json", json.dumps(hf_config_dict(cfg, dtype), indent=1).encode())
  if len(shards) > 1:
    index = dict(metadata=dict(total_size=sum(math.prod(s) * d.itemsize for _, d, s in flat)),
                 weight_map={k: names[i] for i, shard in enumerate(shards) for k, _, _ in shard})
    fs.pipe_file(f"{path}/model.safetensors.index.json", json.dumps(index, indent=1).encode())
  where = {k: i for i, shard in enumerate(shards) for k, _, _ in shard}
  expect = iter(layout)
  cur, f = -1, None
  try:
    for name, arr in items:
      lname, rule, entries = next(expect)
      if name != lname or tuple(arr.shape) != tuple(shapes[name][0]):
        raise CheckpointError(f"write_hf: got {name} {arr.shape}, expected {lname} {shapes[lname][0]}")
      for (key, x), (ekey, edtype, eshape) in zip(_hf_tensors(rule, arr, cfg), entries):
        assert key == ekey and x.shape == tuple(eshape) and x.dtype == edtype, (key, ekey, x.shape, eshape)
        if where[key] != cur:
          if f is not None:
            f.close()
          cur = where[key]
          f = fs.open(f"{path}/{names[cur]}", "wb")
          write_header(f, shards[cur])
        f.write(memoryview(x.reshape(-1).view(np.uint8)))
  finally:
    if f is not None:
      f.close()


def write_hf(flat_params: Mapping[str, np.ndarray], cfg: configs.PaliGemmaConfig, dir_uri: str,
             max_shard_bytes: Optional[int] = None) -> None:
  """Writes big_vision params as a HF PaliGemma directory: config.json + model.safetensors, or shards
  `model-0000i-of-0000n.safetensors` + model.safetensors.index.json when `max_shard_bytes` is exceeded.
  Legacy hub key spelling; embeddings padded to 257216 rows (zeros) like the HF converters; lm_head tied."""
  names = sorted(flat_params)
  shapes = {k: (tuple(flat_params[k].shape), flat_params[k].dtype) for k in names}
  write_hf_stream(((k, flat_params[k]) for k in names), shapes, cfg, dir_uri, max_shard_bytes)

