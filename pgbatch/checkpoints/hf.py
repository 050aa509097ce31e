"""Opening a Hugging Face PaliGemma directory (config.json + model.safetensors, or shards with an index) as a
big_vision checkpoint: tensors are found under any transformers spelling, checked layer by layer, and
transposed/reshaped on the fly (`hf_mapping`) when read."""
from __future__ import annotations

import json
import os
from typing import Optional

import numpy as np

from pgbatch.checkpoints.architecture import config_from_hf
from pgbatch.checkpoints.checkpoint import FORMAT_HF, Checkpoint, make_info
from pgbatch.checkpoints.errors import CheckpointNotFoundError, UnknownFormatError, corrupt
from pgbatch.checkpoints.hf_mapping import IGNORED_HF, TXT, VIS, canonical_hf_key, rules, same, shape_of
from pgbatch.checkpoints.safetensors_file import SafetensorsFile
from pgbatch.checkpoints.sources import file_info
from pgbatch.model import configs

_INDEX = "model.safetensors.index.json"


class _HfFiles:
  """The safetensors files of one directory, addressed by canonical HF key (`canonical_hf_key`)."""

  def __init__(self, uri, readers: dict[str, SafetensorsFile], weight_map: Optional[dict[str, str]]):
    self.readers = readers
    self.where: dict[str, tuple[str, str]] = {}  # canonical HF key → (file, key as stored)
    for fname, st in readers.items():
      for key in st.entries:
        if weight_map is not None and weight_map.get(key, fname) != fname:
          continue
        self.where[canonical_hf_key(key)] = (fname, key)
    for key, fname in (weight_map or {}).items():
      if canonical_hf_key(key) not in self.where:
        raise corrupt(uri, f"{_INDEX} maps {key} to {fname}, which does not contain it")

  def entry(self, k):
    """(dtype, shape, begin, end) of canonical key `k`."""
    fname, key = self.where[k]
    return self.readers[fname].entries[key]

  def source(self, k) -> str:
    return f"{self.where[k][1]} in {self.where[k][0]}"

  def read(self, k, rows=None, dtype=None) -> np.ndarray:
    fname, key = self.where[k]
    return self.readers[fname].read(key, rows=rows, dtype=dtype)

  def close(self):
    for r in self.readers.values():
      r.close()


def _require_layout(uri, fs, path):
  """→ (config.json info, index info or None); raises unless the directory has the HF layout."""
  cfg_info, index_info = file_info(fs, f"{path}/config.json"), file_info(fs, f"{path}/{_INDEX}")
  single_info = file_info(fs, f"{path}/model.safetensors")
  if cfg_info is not None and (index_info is not None or single_info is not None):
    return cfg_info, index_info
  found = sorted(os.path.basename(p) for p in fs.ls(path, detail=False))[:10]
  if not found:
    raise CheckpointNotFoundError(f"checkpoint not found: {uri} is an empty directory")
  hint = ("; PyTorch .bin weights are pickles and are not read: save them as safetensors first "
          "(transformers: save_pretrained(dir, safe_serialization=True))" if any(
              f.endswith(".bin") for f in found) else "")
  raise UnknownFormatError(f"cannot tell the format of {uri}: a directory needs config.json and "
                           f"model.safetensors or {_INDEX} (Hugging Face layout); "
                           f"found {', '.join(found)}{hint}")


def _weight_files(uri, fs, path, index_info) -> tuple[list[str], Optional[dict[str, str]]]:
  """→ (safetensors file names, weight map of the index or None)."""
  if index_info is None:
    return ["model.safetensors"], None
  try:
    weight_map = json.loads(fs.cat_file(f"{path}/{_INDEX}"))["weight_map"]
    return sorted(set(weight_map.values())), weight_map
  except (ValueError, KeyError, TypeError, AttributeError) as e:
    raise corrupt(uri, f"{_INDEX} is not a safetensors index ({e!r})") from None


def _open_files(uri, fs, path, files, weight_map) -> tuple[_HfFiles, list[dict]]:
  """Opens every safetensors file (headers checked) → (files, their fsspec infos)."""
  readers, infos = {}, []
  try:
    for name in files:
      i = file_info(fs, f"{path}/{name}")
      if i is None:
        raise corrupt(uri, f"shard {name} named in {_INDEX} is missing")
      infos.append(i)
      readers[name] = SafetensorsFile(uri, fs, f"{path}/{name}", int(i["size"]))
    return _HfFiles(uri, readers, weight_map), infos
  except BaseException:
    for r in readers.values():
      r.close()
    raise


def _read_json(uri, fs, path, name):
  try:
    return json.loads(fs.cat_file(f"{path}/{name}"))
  except ValueError as e:
    raise corrupt(uri, f"{name} is not valid JSON ({e})") from None


def _config(uri, hf_cfg: dict, hf: _HfFiles) -> configs.PaliGemmaConfig:
  """The config of config.json, with image size and vocabulary taken from the tensor shapes where present."""
  pos, emb = VIS + "embeddings.position_embedding.weight", TXT + "embed_tokens.weight"
  return config_from_hf(hf_cfg, num_patches=hf.entry(pos)[1][0] if pos in hf.where else None,
                        vocab_rows=hf.entry(emb)[1][0] if emb in hf.where else None, uri=uri)


def _plan(cfg, hf: _HfFiles, files: list[str]):
  """Big_vision names and shapes the HF tensors give → (shapes, plan, sources, missing).

  shapes: name → (big_vision shape, stored dtype), plus unmapped HF keys under their HF name; plan: name →
  (rule, per-layer HF keys); sources: name → where it comes from; missing: name → the HF tensors not found.
  """
  shapes, plan, sources, missing, used = {}, {}, {}, {}, set()
  in_files = " or ".join(files)
  for rule in rules(cfg):
    layers = range(cfg.text.depth if rule.bv.startswith("llm/") else cfg.vision.depth) if rule.stacked else [None]
    keys = [tuple(k.format(i=i) for k in rule.hf) for i in layers]
    absent = [k for ks in keys for k in ks if k not in hf.where]
    used.update(k for ks in keys for k in ks if k in hf.where)
    if absent:
      missing[rule.bv] = f"HF {', '.join(absent[:4])}{' …' if len(absent) > 4 else ''} not found in {in_files}"
      continue
    layer_shapes = [tuple(hf.entry(k)[1] for k in ks) for ks in keys]
    odd = next((i for i, s in enumerate(layer_shapes) if s != layer_shapes[0]), None)
    sources[rule.bv] = "HF " + ", ".join(hf.source(k) for k in keys[0])
    if odd is not None:  # one layer differs: report that layer's HF tensors and shapes
      shapes[rule.bv] = (tuple(layer_shapes[odd][0]), hf.entry(keys[odd][0])[0])
      sources[rule.bv] = f"HF {', '.join(hf.source(k) for k in keys[odd])} differs from layer 0 {layer_shapes[0]}"
      continue
    bv_shape = shape_of(rule.to_bv, *layer_shapes[0])
    if bv_shape is None:  # the tensor does not fit config.json's heads/head_dim: report the HF shape
      bv_shape = layer_shapes[0][0]
    if rule.vocab_rows:
      bv_shape = (min(bv_shape[0], cfg.text.vocab_size),) + bv_shape[1:]
    if rule.stacked:
      bv_shape = (len(keys),) + bv_shape
    shapes[rule.bv] = (bv_shape, hf.entry(keys[0][0])[0])
    plan[rule.bv] = (rule, keys)
  for k in sorted(set(hf.where) - used):
    if not IGNORED_HF.match(k):
      shapes[k] = (hf.entry(k)[1], hf.entry(k)[0])
      sources[k] = f"HF {hf.source(k)}"
  return shapes, plan, sources, missing


def _reader(hf: _HfFiles, plan, shapes):
  """read(name, dtype) → the big_vision tensor, assembled one layer at a time and cast into the stack."""

  def read(name, dtype=None):
    if name not in plan:
      return hf.read(name, dtype=dtype)
    rule, keys = plan[name]
    shape, stored = shapes[name]
    rows = shape[-2] if rule.vocab_rows else None
    if rule.to_bv is same and not rule.stacked:  # as stored: stream with the cast
      return hf.read(keys[0][0], rows, dtype)
    out = np.empty(shape, stored if dtype is None else dtype)
    if not rule.stacked:
      out[...] = rule.to_bv(*[hf.read(k, rows) for k in keys[0]])
    for i, ks in enumerate(keys if rule.stacked else []):
      out[i] = rule.to_bv(*[hf.read(k, rows) for k in ks])
    return out

  return read


def open_hf(uri, fs, path) -> Checkpoint:
  """Opens the HF directory `path` of `fs` (headers and config.json only)."""
  cfg_info, index_info = _require_layout(uri, fs, path)
  hf_cfg = _read_json(uri, fs, path, "config.json")
  files, weight_map = _weight_files(uri, fs, path, index_info)
  hf, infos = _open_files(uri, fs, path, files, weight_map)
  try:
    cfg = _config(uri, hf_cfg, hf)
    shapes, plan, sources, missing = _plan(cfg, hf, files)
  except BaseException:
    hf.close()
    raise
  infos = [cfg_info] + ([index_info] if index_info else []) + infos
  return Checkpoint(make_info(uri, FORMAT_HF, fs, infos), cfg, shapes, _reader(hf, plan, shapes), sources, missing,
                    hf.close)
