"""`pgbatch bench --cost`: what the real programs cost on a target, compiled from abstract shapes.

No weights are allocated and no accelerator is needed: parameters and inputs are `jax.ShapeDtypeStruct`s (with
their NamedSharding on the target's mesh), the programs are lowered and compiled for the host CPU or, with the
`libtpu` wheel installed (`pip install pgbatch[tpu-cost]`), deviceless for a TPU v5e host. Per phase (SigLIP,
prefill, one decode step) it reports XLA's FLOPs and bytes accessed; per device the memory of the weights plus
the largest program's activations (`memory_analysis`); the count of full-cache copies in the decode loop (HLO);
and a roofline estimate of images/s on H100, H200 and v5e.

`cost_analysis` counts a rolled loop body once, so phase costs come from the model compiled at depth 1 and 2
with the layer loops unrolled, extrapolated linearly to the real depth. Memory and cache copies come from the
real-depth programs as they run. The CPU backend has no bf16 matmul: it converts bf16 weights to f32 inside a
standalone phase program, which would count the conversion as traffic; on `cpu` the phases are therefore
compiled in float32 and their bytes scaled to the requested dtype (`phase_bytes_scaled`). TPU phases are the
bf16 programs as compiled.
"""
from __future__ import annotations

import json
import math
import os
import re

GIB = 1 << 30
# Dense bf16 peak FLOP/s, memory bandwidth (bytes/s) and memory per device (bytes): vendor data sheets.
DEVICES = {
    "h100": dict(flops=989e12, bandwidth=3.35e12, memory=80 * GIB),
    "h200": dict(flops=989e12, bandwidth=4.8e12, memory=141 * GIB),
    "v5e": dict(flops=197e12, bandwidth=819e9, memory=16 * GIB),
}
# target -> (TPU topology name, chips per host bounds); "cpu" is the host this runs on.
TPU_TARGETS = {"tpu-v5e-1": ("v5e:1x1", (1, 1, 1)), "tpu-v5e-4": ("v5e:2x2", (2, 2, 1)),
               "tpu-v5e-8": ("v5e:2x4", (2, 4, 1))}
TPU_HBM = int(15.75 * GIB)  # what the v5e compiler lets a program use


def target_devices(target: str):
  """The devices of `target`: this host's CPU, or a deviceless TPU v5e host (needs libtpu)."""
  import jax
  if target == "cpu":
    return jax.devices("cpu")[:1]
  if target not in TPU_TARGETS:
    raise ValueError(f"unknown target {target!r}; known: cpu, {', '.join(TPU_TARGETS)}")
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  try:
    import libtpu  # noqa: F401
  except ImportError:
    raise RuntimeError(f"--target {target} needs the libtpu wheel: pip install 'pgbatch[tpu-cost]'") from None
  from jax.experimental import topologies
  name, bounds = TPU_TARGETS[target]
  return topologies.get_topology_desc(topology_name=name, platform="tpu", chip_config_name="default",
                                      chips_per_host_bounds=bounds, wrap=(False, False, False)).devices


def abstract_params(cfg, dtype, mesh):
  """The parameter tree as ShapeDtypeStructs, sharded as `pgbatch.model.load` would place them."""
  import jax
  import jax.numpy as jnp
  from pgbatch.model import configs, unflatten
  from pgbatch.model.sharding import param_sharding
  return unflatten({name: jax.ShapeDtypeStruct(shape, jnp.dtype(dtype), sharding=param_sharding(name, shape, mesh))
                    for name, shape in configs.param_shapes(cfg).items()})


def _batch_arg(mesh, shape, dtype):
  import jax
  from pgbatch.model.sharding import batch_sharding
  return jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding(mesh, len(shape)))


def programs(cfg, batch: int, prompt_len: int, new_tokens: int, dtype, mesh) -> dict:
  """name -> (jitted function, abstract args): the engine's encode and generate programs, and the phases
  (encode, prefill, one decode step) as separate programs for costing."""
  import jax
  import jax.numpy as jnp
  from pgbatch.engine import _encode_uint8
  from pgbatch.model import paligemma
  from pgbatch.model.replica import PROMPT_BUCKETS, _bucket
  params = abstract_params(cfg, dtype, mesh)
  t = _bucket(prompt_len, PROMPT_BUCKETS)
  r, p, d = cfg.image_size, cfg.num_image_tokens, cfg.text.width
  images = _batch_arg(mesh, (batch, r, r, 3), jnp.uint8)
  zimg = _batch_arg(mesh, (batch, p, d), jnp.dtype(dtype))
  tokens = _batch_arg(mesh, (batch, t), jnp.int32)
  lengths = _batch_arg(mesh, (batch,), jnp.int32)
  valid = _batch_arg(mesh, (batch,), jnp.bool_)
  prefill = jax.jit(paligemma.prefill, static_argnames=("cfg", "max_new_tokens"))
  state = jax.eval_shape(lambda *a: prefill(*a, cfg=cfg, max_new_tokens=new_tokens)[1], params, zimg, tokens, lengths)
  state = jax.tree.map(lambda s: _batch_arg(mesh, s.shape, s.dtype) if s.shape[0] == batch and len(s.shape) < 5
                       else jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=_cache_sharding(mesh, s.shape)), state)
  token = _batch_arg(mesh, (batch,), jnp.int32)
  step = jax.jit(paligemma.decode_step, static_argnames="cfg")
  return {
      "encode": (lambda: _encode_uint8.lower(params, images, cfg=cfg)),
      "prefill": (lambda: prefill.lower(params, zimg, tokens, lengths, cfg=cfg, max_new_tokens=new_tokens)),
      "decode_step": (lambda: step.lower(params, token, jnp.int32(1), state, cfg=cfg)),
      "generate": (lambda: paligemma.generate_tokens.lower(params, zimg, tokens, lengths, valid, cfg=cfg,
                                                           max_new_tokens=new_tokens)),
  }


def _cache_sharding(mesh, shape):
  """Caches [L, B, S, K, H] (or [B, S, K, H]): batch over "data"."""
  from jax.sharding import NamedSharding, PartitionSpec
  spec = [None] * len(shape)
  spec[len(shape) - 4] = "data"
  return NamedSharding(mesh, PartitionSpec(*spec))


def _cost(compiled) -> dict:
  c = compiled.cost_analysis()
  c = c[0] if isinstance(c, (list, tuple)) else c
  return {"flops": float(c.get("flops", 0.0)), "bytes": float(c.get("bytes accessed", 0.0))}


def phase_costs(cfg, batch, prompt_len, new_tokens, dtype, mesh) -> dict:
  """Per phase {flops, bytes} per device at the real depth, extrapolated from unrolled depth-1 and depth-2
  compiles (the towers' layer loops are the only loops in these programs)."""
  at = {}
  for depth in (1, 2):
    progs = programs(cfg.with_depth(depth), batch, prompt_len, new_tokens, dtype, mesh)
    at[depth] = {name: _cost(progs[name]().compile()) for name in ("encode", "prefill", "decode_step")}
  depth_of = {"encode": cfg.vision.depth, "prefill": cfg.text.depth, "decode_step": cfg.text.depth}
  out = {}
  for name, real_depth in depth_of.items():
    one, two = at[1][name], at[2][name]
    out[name] = {k: one[k] + (real_depth - 1) * (two[k] - one[k]) for k in one}
  return out


def memory(compiled) -> dict:
  m = compiled.memory_analysis()
  fields = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
            "generated_code_size_in_bytes", "alias_size_in_bytes")
  return {f.replace("_size_in_bytes", ""): int(getattr(m, f, 0) or 0) for f in fields}


def weight_bytes_per_device(cfg, dtype, mesh) -> int:
  """Bytes of all parameters on the most loaded device (sharded over "model" where the rules allow)."""
  import jax.numpy as jnp
  from pgbatch.model import configs
  from pgbatch.model.sharding import param_spec
  total, itemsize = 0, jnp.dtype(dtype).itemsize
  for name, shape in configs.param_shapes(cfg).items():
    spec = param_spec(name, shape, mesh)
    split = math.prod(mesh.shape[a] for a in spec if a is not None)
    total += math.prod(shape) * itemsize // split
  return total


# --- HLO inspection ---------------------------------------------------------------------------------------------

_COMP = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$")
_CALLS = re.compile(r"(?:body|condition|calls|to_apply|branch_computations)=\{?%?([\w.\-, %]+)\}?")
_SHAPE = re.compile(r"=\s*\(?([a-z]+\d*)\[([\d,]*)\]")


def _computations(hlo: str) -> tuple[dict[str, list[str]], str]:
  comps, name, entry = {}, None, None
  for line in hlo.splitlines():
    m = _COMP.match(line)
    if m and "=" not in line.split("{")[0].split("->")[0].split("(")[0]:
      name = m.group(1)
      comps[name] = []
      if line.startswith("ENTRY"):
        entry = name
    elif name is not None and line.strip() and line.strip() != "}":
      comps[name].append(line.strip())
  return comps, entry


def _callees(lines: list[str]) -> set[str]:
  out = set()
  for line in lines:
    for m in _CALLS.finditer(line):
      out.update(n.strip().lstrip("%") for n in m.group(1).split(","))
  return out


def _reachable(comps, roots) -> set[str]:
  seen, todo = set(), list(roots)
  while todo:
    c = todo.pop()
    if c in seen or c not in comps:
      continue
    seen.add(c)
    todo.extend(_callees(comps[c]))
  return seen


def decode_loop_cache_copies(hlo: str, cache_dims: tuple[int, ...]) -> int:
  """Copies of a whole KV cache made inside the decode loop of an optimized HLO module, per step.

  The decode loop is the top-level `while` whose body holds another loop (the layer loop). A copy counts when
  its result has the cache's shape: the stacked cache [L, B, S, K, H] (`cache_dims`), or one layer's
  [B, S, K, H] copied inside the layer loop (executed once per layer: one whole cache per step).
  """
  comps, entry = _computations(hlo)
  loops = [l for l in comps.get(entry, []) if " while(" in l]
  layer_shape = ",".join(map(str, cache_dims[1:]))
  stack_shape = ",".join(map(str, cache_dims))
  count = 0
  for loop in loops:
    body = re.search(r"body=%?([\w.\-]+)", loop).group(1)
    inside = _reachable(comps, [body])
    if not any(" while(" in l for c in inside for l in comps[c]):
      continue
    for c in inside:
      for line in comps[c]:
        op = re.search(r"\s([a-z\-]+)\(", line.split("=", 1)[1]) if "=" in line else None
        shape = _SHAPE.search(line)
        if op and shape and op.group(1) in ("copy", "copy-start") and shape.group(2) in (stack_shape, layer_shape):
          count += 1
  return count


# --- the report ---------------------------------------------------------------------------------------------------


def roofline(phases: dict, batch: int, new_tokens: int) -> dict:
  """Images/s of one replica per device kind: each phase bound by compute or by memory traffic, decode_step
  run new_tokens - 1 times. Phase figures are per device (all devices of a mesh work at once)."""
  out = {}
  for kind, d in DEVICES.items():
    seconds = 0.0
    for name, c in phases.items():
      repeat = max(new_tokens - 1, 0) if name == "decode_step" else 1
      seconds += repeat * max(c["flops"] / d["flops"], c["bytes"] / d["bandwidth"])
    out[kind] = round(batch / seconds, 1) if seconds else None
  return out


def analyze(variant: str, batch: int, target: str = "cpu", new_tokens: int = 20, prompt_len: int = 4,
            dtype: str = "bfloat16", in_flight: int = 1, mesh_shape: tuple[int, int] | None = None) -> dict:
  """One report: {variant, batch, target, mesh, phases, per_device_bytes, fits, decode_cache_copies,
  predicted_img_s, ...}. See the module docstring."""
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import Mesh
  from pgbatch import placement
  from pgbatch.model import configs
  cfg = configs.get(variant)
  devices = target_devices(target)
  data, model = mesh_shape or ((1, 1) if target == "cpu" else placement.mesh_shape(len(devices), variant))
  if batch % data:
    raise ValueError(f"batch {batch} is not a multiple of the mesh's data axis ({data})")
  mesh = Mesh(np.array(devices[:data * model]).reshape(data, model), ("data", "model"))
  report = dict(variant=variant, batch=batch, target=target, mesh=dict(data=data, model=model),
                new_tokens=new_tokens, prompt_len=prompt_len, dtype=dtype, in_flight=in_flight)
  weights = weight_bytes_per_device(cfg, dtype, mesh)
  progs = programs(cfg, batch, prompt_len, new_tokens, dtype, mesh)
  mem, errors, copies = {}, {}, None
  for name in ("encode", "generate"):
    try:
      compiled = progs[name]().compile()
    except Exception as e:  # noqa: BLE001 - the TPU compiler refuses programs that cannot fit
      errors[name] = str(e).splitlines()[0][:300]
      continue
    mem[name] = memory(compiled)
    if name == "generate":
      t = cfg.text
      slots = cfg.num_image_tokens + _prompt_bucket(prompt_len) + new_tokens
      copies = decode_loop_cache_copies(compiled.as_text(),
                                        (t.depth, batch // data, slots, t.num_kv_heads, t.head_dim))
  # Activations: what a program needs beyond its (weight) arguments; weights counted once for both towers.
  activations = max((m["output"] + m["temp"] + m["generated_code"] - m["alias"] for m in mem.values()), default=0)
  per_device = weights + in_flight * activations
  capacity = TPU_HBM if target.startswith("tpu") else None
  phase_dtype, phase_scale = dtype, 1.0
  if target == "cpu" and jnp.dtype(dtype).itemsize < 4:
    phase_dtype, phase_scale = "float32", jnp.dtype(dtype).itemsize / 4
  phases = phase_costs(cfg, batch, prompt_len, new_tokens, phase_dtype, mesh)
  phases = {k: {"flops": v["flops"], "bytes": v["bytes"] * phase_scale} for k, v in phases.items()}
  report.update(
      phase_bytes_scaled=phase_scale if phase_scale != 1 else None,
      phases={k: {"flops": v["flops"], "bytes": v["bytes"]} for k, v in
              (("siglip", phases["encode"]), ("prefill", phases["prefill"]), ("decode_step", phases["decode_step"]))},
      weight_bytes_per_device=weights, activation_bytes_per_device=activations, per_device_bytes=per_device,
      fits=(not errors) and (per_device <= capacity if capacity else True),
      fits_by_device={k: (not errors) and per_device <= d["memory"] for k, d in DEVICES.items()},
      decode_cache_copies=copies, programs=mem, compile_errors=errors or None,
      predicted_img_s=roofline(phases, batch, new_tokens))
  if capacity is None:
    report["fits"] = report["fits_by_device"]["h100"]
  return report


def _prompt_bucket(prompt_len: int) -> int:
  from pgbatch.model.replica import PROMPT_BUCKETS, _bucket
  return _bucket(prompt_len, PROMPT_BUCKETS)


def main_cost(args) -> int:
  """`pgbatch bench --cost`: one JSON object per (variant, batch, target)."""
  variants = args.variant.split(",")
  for target in args.target.split(","):
    for variant in variants:
      for batch in (int(b) for b in args.batch.split(",")):
        print(json.dumps(analyze(variant, batch, target, args.new_tokens, args.prompt_len, args.dtype,
                                 args.in_flight)), flush=True)
  return 0
