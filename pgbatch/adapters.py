"""Fine-tune adapters merged into PaliGemma weights at load: `model.adapters: [uri, …]`.

Two formats, told apart by the URI:
  * a Hugging Face PEFT LoRA directory (`adapter_config.json` + `adapter_model.safetensors`), as written by
    `peft`'s `save_pretrained` for `PaliGemmaForConditionalGeneration` (any transformers key spelling). Each
    targeted Linear gets W += scale * B @ A with scale = lora_alpha / r (lora_alpha / sqrt(r) with use_rslora;
    rank_pattern / alpha_pattern honoured); embedding LoRA (lora_embedding_A/B) is merged too.
  * a big_vision-style `.npz` of deltas: members named like the params (`llm/layers/attn/q_einsum/w`), each
    with exactly that param's shape, added to it.

`open_adapter(uri, cfg)` reads and checks an adapter against the model config (names, ranks, shapes) before
any weight is placed: every problem is an AdapterError naming the adapter tensor. `merge(stream, adapters)`
then adds the deltas on the device, tensor by tensor (stacked layers one layer at a time), as the checkpoint
streams onto the mesh: host memory holds one layer's delta. `Adapter.info` (uri, sha256 of the adapter's
bytes) goes into provenance. No JAX at import (the pipeline's preflight uses `open_adapter`).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import math
import re
from typing import Any, Callable, Iterable, Iterator, Optional

import numpy as np

from pgbatch import checkpoints
from pgbatch.checkpoints import hf_mapping
from pgbatch.checkpoints.architecture import hf_vocab_rows
from pgbatch.checkpoints.npz import _Npz  # pylint: disable=protected-access  (the streaming member reader)
from pgbatch.model import configs

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(.+)\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B)"
                       r"(?:\.[A-Za-z0-9_]+)?(?:\.weight)?$")


class AdapterError(checkpoints.CheckpointError):
  """An adapter cannot be read or does not fit the model; the message names the adapter and the tensor."""


@dataclasses.dataclass(frozen=True)
class AdapterInfo:
  """Provenance of one adapter: where it was read from and the sha256 of its files' bytes."""
  uri: str
  format: str   # "peft_lora" | "big_vision_npz"
  digest: str

  def as_dict(self) -> dict[str, str]:
    return {"uri": self.uri, "digest": self.digest}


@dataclasses.dataclass
class Adapter:
  """A checked adapter: for each big_vision param it touches, `layers[name]` maps a layer index (None for an
  unstacked param) to a function building that layer's float32 delta in the big_vision layout."""
  info: AdapterInfo
  layers: dict[str, dict[Optional[int], Callable[[], np.ndarray]]]
  skipped: tuple[str, ...] = ()   # adapter modules outside PaliGemma's forward (SigLIP's unused MAP head)
  close: Optional[Callable[[], None]] = dataclasses.field(default=None, repr=False)
  replace: dict[str, dict[Optional[int], Callable[[], np.ndarray]]] = dataclasses.field(default_factory=dict)


def _sha256(fs, paths: Iterable[str]) -> str:
  """sha256 over "name sha256(bytes)" lines, in the given order."""
  lines = []
  for p in paths:
    h = hashlib.sha256()
    with fs.open(p, "rb") as f:
      while chunk := f.read(16 << 20):
        h.update(chunk)
    lines.append(f"{p.rsplit('/', 1)[-1]} {h.hexdigest()}\n")
  return "sha256:" + hashlib.sha256("".join(lines).encode()).hexdigest()


def open_adapter(uri: str, cfg: configs.PaliGemmaConfig) -> Adapter:
  """Reads and checks one adapter (a PEFT directory or a big_vision .npz) against `cfg`."""
  import fsspec
  uri = str(uri)
  try:
    fs, path = fsspec.core.url_to_fs(uri)
    path = path.rstrip("/")
    if fs.isdir(path):
      return _open_peft(uri, fs, path, cfg)
    if fs.isfile(path) and path.endswith(".npz"):
      return _open_npz(uri, fs, path, cfg)
    if not fs.exists(path):
      raise AdapterError(f"adapter not found: {uri}")
  except AdapterError:
    raise
  except checkpoints.CheckpointError as e:
    raise AdapterError(f"adapter {uri}: {e}") from None
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise AdapterError(f"cannot read adapter {uri}: {type(e).__name__}: {e}") from None
  raise AdapterError(f"adapter {uri}: expected a PEFT LoRA directory ({PEFT_CONFIG} + {PEFT_WEIGHTS}) or a "
                     "big_vision .npz of deltas")


# ---------------------------------------------------------------------------------------------------------------
# PEFT LoRA.


def _hf_index(cfg) -> dict[str, tuple[Any, Optional[int], int, tuple[int, ...], tuple[tuple[int, ...], ...]]]:
  """Canonical HF weight key -> (rule, layer or None, position in rule.hf, big_vision shape, HF shapes)."""
  shapes = configs.param_shapes(cfg)
  out = {}
  for rule in hf_mapping.rules(cfg):  # the one big_vision <-> HF table
    bv_shape = tuple(shapes[rule.bv])
    layer_shape = bv_shape[1:] if rule.stacked else bv_shape
    hf_shapes = ((hf_vocab_rows(bv_shape[0]),) + bv_shape[1:],) if rule.vocab_rows else \
        hf_mapping.shape_of(rule.to_hf, layer_shape)
    for i in (range(bv_shape[0]) if rule.stacked else [None]):
      for j, key in enumerate(rule.hf):
        out[key.format(i=i)] = (rule, i, j, bv_shape, hf_shapes)
  return out


def _pattern_value(patterns: dict, module: str, default):
  """PEFT's rank_pattern / alpha_pattern lookup: exact module name, else a regex matching its tail."""
  for key, value in (patterns or {}).items():
    if key == module or re.fullmatch(rf"(.*\.)?({key})", module):
      return value
  return default


def _read_peft(uri, fs, path) -> tuple[dict, dict[str, np.ndarray], str]:
  from pgbatch.checkpoints.safetensors_file import SafetensorsFile
  cfg_path, weights_path = f"{path}/{PEFT_CONFIG}", f"{path}/{PEFT_WEIGHTS}"
  for p in (cfg_path, weights_path):
    if not fs.exists(p):
      raise AdapterError(f"adapter {uri}: {p.rsplit('/', 1)[-1]} not found (a PEFT LoRA directory has "
                         f"{PEFT_CONFIG} and {PEFT_WEIGHTS}; .bin adapters are pickles and are not read)")
  try:
    config = json.loads(fs.cat_file(cfg_path))
  except ValueError as e:
    raise AdapterError(f"adapter {uri}: {PEFT_CONFIG} is not valid JSON ({e})") from None
  try:
    st = SafetensorsFile(uri, fs, weights_path, fs.size(weights_path))
    try:
      tensors = {key: st.read(key) for key in st.entries}
    finally:
      st.close()
  except Exception as e:  # pylint: disable=broad-except  (a corrupt file: any reader error names it)
    raise AdapterError(f"adapter {uri}: {PEFT_WEIGHTS} is not a readable safetensors file ({e})") from None
  return config, tensors, _sha256(fs, [cfg_path, weights_path])


def _check_peft_config(uri, config: dict) -> None:
  if config.get("peft_type", "LORA") != "LORA":
    raise AdapterError(f"adapter {uri}: {PEFT_CONFIG}.peft_type is {config.get('peft_type')!r}; only LORA "
                       "adapters can be merged")
  for key, what in (("use_dora", "DoRA"), ("lora_bias", "LoRA biases")):
    if config.get(key):
      raise AdapterError(f"adapter {uri}: {PEFT_CONFIG}.{key}: {what} adapters are not supported")
  for key in ("r", "lora_alpha"):
    if not isinstance(config.get(key), (int, float)) or config[key] <= 0:
      raise AdapterError(f"adapter {uri}: {PEFT_CONFIG}.{key} must be a positive number, got {config.get(key)!r}")


def _open_peft(uri, fs, path, cfg) -> Adapter:
  config, tensors, digest = _read_peft(uri, fs, path)
  _check_peft_config(uri, config)
  factors: dict[str, dict[str, tuple[str, np.ndarray]]] = {}
  index, parts, skipped, full = _hf_index(cfg), {}, [], {}
  for key, arr in tensors.items():
    m = _LORA_KEY.match(key)
    if m is None:
      _full_weight(uri, key, arr, index, full)
      continue
    factors.setdefault(m.group(1), {})[m.group(2).replace("embedding_", "")] = (key, arr.astype(np.float32))
  for module, ab in sorted(factors.items()):
    hf_key = checkpoints.canonical_hf_key(module + ".weight")
    if "lora_A" not in ab or "lora_B" not in ab:
      have = next(iter(ab.values()))[0]
      raise AdapterError(f"adapter {uri}: tensor {have} has no matching "
                         f"{'lora_B' if 'lora_A' in ab else 'lora_A'} factor")
    if hf_key not in index:
      if hf_mapping.IGNORED_HF.match(hf_key):
        skipped.append(module)
        continue
      raise AdapterError(f"adapter {uri}: tensor {ab['lora_A'][0]} targets {module}, which is not a weight of "
                         f"{cfg.name}")
    rank = _pattern_value(config.get("rank_pattern"), module, config["r"])
    alpha = _pattern_value(config.get("alpha_pattern"), module, config["lora_alpha"])
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    rule, layer, pos, bv_shape, hf_shapes = index[hf_key]
    build = _lora_delta(uri, module, ab, rank, scale, hf_shapes[pos], "embedding" in ab["lora_A"][0],
                        bool(config.get("fan_in_fan_out")))
    entry = parts.setdefault((rule.bv, layer), (rule, hf_shapes, bv_shape[-2] if rule.vocab_rows else None, []))
    entry[3].append((pos, build))
  layers: dict[str, dict] = {}
  for (name, layer), (rule, hf_shapes, vocab, builders) in parts.items():
    layers.setdefault(name, {})[layer] = functools.partial(_to_bv, rule, hf_shapes, builders, vocab)
  return Adapter(AdapterInfo(uri, "peft_lora", digest), layers, tuple(skipped), replace=full)


def _full_weight(uri, key, arr, index, full) -> None:
  """A full weight saved with the adapter (PEFT saves a targeted tied embedding as `….base_layer.weight`, and
  `modules_to_save` as the module's weight): it replaces the model's tensor before the deltas are added."""
  module = re.sub(r"^base_model\.model\.", "", key)
  hf_key = checkpoints.canonical_hf_key(re.sub(r"\.(base_layer|modules_to_save\.[A-Za-z0-9_]+)\.weight$",
                                               ".weight", module))
  if hf_key not in index:
    if hf_mapping.IGNORED_HF.match(hf_key):
      return
    raise AdapterError(f"adapter {uri}: tensor {key} is neither a LoRA factor (lora_A / lora_B) nor a weight of "
                       "the model")
  rule, layer, _, bv_shape, hf_shapes = index[hf_key]
  if len(rule.hf) != 1:
    raise AdapterError(f"adapter {uri}: tensor {key}: replacing one of {', '.join(rule.hf)} is not supported")
  shape = hf_shapes[0]
  if rule.vocab_rows and arr.ndim == 2 and arr.shape[1] == shape[1] and arr.shape[0] >= bv_shape[0]:
    arr = arr[:bv_shape[0]]  # HF rows past the vocabulary are dropped, as when loading a checkpoint
    shape = arr.shape
  if tuple(arr.shape) != tuple(shape):
    raise AdapterError(f"adapter {uri}: tensor {key} has shape {tuple(arr.shape)}, the model's {hf_key} has "
                       f"{tuple(shape)}")
  value = arr.astype(np.float32)
  full.setdefault(rule.bv, {})[layer] = lambda: np.asarray(rule.to_bv(value), np.float32)


def _lora_delta(uri, module, ab, rank, scale, hf_shape, embedding: bool, fan_in_fan_out: bool):
  """A function building the HF-layout delta scale * B @ A (checked now, computed when merged)."""
  (ka, a), (kb, b) = ab["lora_A"], ab["lora_B"]
  if a.ndim != 2 or b.ndim != 2:
    raise AdapterError(f"adapter {uri}: tensor {ka if a.ndim != 2 else kb} has shape "
                       f"{(a if a.ndim != 2 else b).shape}; only 2-D LoRA factors (Linear, Embedding) are supported")
  if embedding:  # lora_embedding_A [r, num_embeddings], lora_embedding_B [dim, r]; delta = (B @ A).T
    a_rank, b_rank, want = a.shape[0], b.shape[1], (a.shape[1], b.shape[0])
  else:          # lora_A [r, in], lora_B [out, r]; delta = B @ A  [out, in]
    a_rank, b_rank, want = a.shape[0], b.shape[1], (b.shape[0], a.shape[1])
  if a_rank != rank or b_rank != rank:
    bad = ka if a_rank != rank else kb
    raise AdapterError(f"adapter {uri}: tensor {bad} has rank {a_rank if bad == ka else b_rank}, but "
                       f"{PEFT_CONFIG} gives r={rank} for {module} (lora_A {a.shape}, lora_B {b.shape})")
  if fan_in_fan_out:
    want = want[::-1]
  if embedding and want[0] >= hf_shape[0] - 64 and want[1] == hf_shape[1]:
    hf_shape = want  # HF embedding rows (padded to a multiple of 64) vary; rows past the vocabulary are dropped
  if tuple(want) != tuple(hf_shape):
    raise AdapterError(f"adapter {uri}: tensors {ka} {a.shape} and {kb} {b.shape} give a delta of shape "
                       f"{tuple(want)} for {module}.weight, which has shape {tuple(hf_shape)}")

  def build():
    d = (b @ a) * np.float32(scale)
    return d.T if embedding != fan_in_fan_out else d
  return build


def _to_bv(rule, hf_shapes, parts, vocab: Optional[int]) -> np.ndarray:
  """One layer's big_vision delta from the HF deltas of some of the rule's HF tensors (others are zero)."""
  hf = [np.zeros(s, np.float32) for s in hf_shapes]
  for pos, build in parts:
    d = build()
    hf[pos] = d[:vocab] if vocab is not None else d
  return np.asarray(rule.to_bv(*hf), np.float32)


# ---------------------------------------------------------------------------------------------------------------
# big_vision npz deltas.


def _open_npz(uri, fs, path, cfg) -> Adapter:
  info = fs.info(path)
  npz = _Npz(uri, fs, [path], [info])
  want = configs.param_shapes(cfg)
  try:
    shapes = npz.names_and_shapes()
  except BaseException:
    npz.close()
    raise
  for name, (shape, _) in shapes.items():
    if name not in want:
      npz.close()
      raise AdapterError(f"adapter {uri}: tensor {name} is not a parameter of {cfg.name}")
    if tuple(shape) != tuple(want[name]):
      npz.close()
      raise AdapterError(f"adapter {uri}: tensor {name} has shape {tuple(shape)}, the parameter has "
                         f"{tuple(want[name])}")
  layers = {name: {None: functools.partial(_read_member, npz, name)} for name in shapes}
  return Adapter(AdapterInfo(uri, "big_vision_npz", _sha256(fs, [path])), layers, close=npz.close)


def _read_member(npz, name) -> np.ndarray:
  return npz.read(name, np.float32)


# ---------------------------------------------------------------------------------------------------------------
# Merging on the device.


def open_all(uris: Iterable[str], cfg: configs.PaliGemmaConfig) -> list[Adapter]:
  """`open_adapter` for each URI, in order (each is checked before any weight is placed)."""
  out = []
  try:
    for uri in uris:
      out.append(open_adapter(uri, cfg))
  except BaseException:
    close_all(out)
    raise
  return out


def close_all(adapters: Iterable[Adapter]) -> None:
  for a in adapters:
    if a.close is not None:
      a.close()


@functools.lru_cache(maxsize=None)
def _ops(donate: bool):
  """{replace?: (whole-tensor op, one-layer op)}; `donate`: the input buffer may be reused (not for the
  array `checkpoints.place` yielded: it still waits on it)."""
  import jax
  import jax.numpy as jnp
  jit = functools.partial(jax.jit, donate_argnums=(0,) if donate else ())

  def add(w, d):
    return (w.astype(jnp.float32) + d).astype(w.dtype)

  def add_layer(w, d, i):
    layer = jax.lax.dynamic_index_in_dim(w, i, 0, keepdims=False)
    return jax.lax.dynamic_update_index_in_dim(w, (layer.astype(jnp.float32) + d).astype(w.dtype), i, 0)

  def set_(w, d):
    return d.astype(w.dtype)

  def set_layer(w, d, i):
    return jax.lax.dynamic_update_index_in_dim(w, d.astype(w.dtype), i, 0)
  return {False: (jit(add), jit(add_layer)), True: (jit(set_), jit(set_layer))}


def merge(stream: Iterable[tuple[str, Any]], adapters: list[Adapter], mesh=None) -> Iterator[tuple[str, Any]]:
  """(name, jax.Array) from `checkpoints.place` -> the same with every adapter's delta added on the device.

  A stacked param gets its deltas one layer at a time; each delta is placed on the param's sharding (its
  layer's) and added in float32, the result cast back to the param dtype. Full weights saved with an adapter
  (`Adapter.replace`) are put in place first."""
  import jax
  from pgbatch.model import sharding
  for name, w in stream:
    owned = False
    for adapter in adapters:
      for replace, per_layer in ((True, adapter.replace.get(name, {})), (False, adapter.layers.get(name, {}))):
        whole, one_layer = _ops(owned)[replace]
        for layer, build in sorted(per_layer.items(), key=lambda kv: -1 if kv[0] is None else kv[0]):
          d = build()
          target = w.sharding if mesh is None else sharding.param_sharding(name, d.shape, mesh)
          d = jax.device_put(d, target)
          w = whole(w, d) if layer is None else one_layer(w, d, np.int32(layer))
          owned = True
          whole, one_layer = _ops(owned)[replace]
          del d
    yield name, w
