"""The Ray Data plan: one item per shard → read → decode + image safety (CPU tasks) → annotate (accelerator
actors around `pgbatch.annotate`) → text safety (CPU actors). Actors are thin, in the shape of Ray's
batch-inference examples: `__init__` loads, `__call__` maps one batch. Stages never drop rows: a failure becomes
status "error" with the stage and reason. The only module that builds on `ray.data`."""
from __future__ import annotations

import datetime
import json
import logging
import threading
import time
from typing import Any, Optional

import numpy as np
import pyarrow as pa

from pgbatch import annotate, placement, schema

log = logging.getLogger(__name__)
SHARD_ROWS = "_shard_rows"
READ_AT = "_read_at"     # epoch seconds when the shard was read (per-shard latency in the manifest)
INTERNAL = (SHARD_ROWS, READ_AT)
# Read/decode tasks: an exception that escapes them (a transient I/O error; bad data becomes error rows) is
# retried a few times before the run fails; the shard is then redone by the next run.
RETRY_ARGS = {"max_retries": 5, "retry_exceptions": True}
_PRE_FILTERS: dict[str, Any] = {}   # per worker process: policy JSON -> PreFilter (models load once)


def error_json(stage: str, exc_or_type: Any, message: str | None = None) -> str:
  """`readers.error_json` for an exception (or a type name), the message cut at 2000 characters."""
  from pgbatch.io import readers
  type_ = exc_or_type if isinstance(exc_or_type, str) else type(exc_or_type).__name__
  return readers.error_json(stage, type_, (str(exc_or_type) if message is None else message)[:2000])


def _as_object(values) -> np.ndarray:
  out = np.empty(len(values), dtype=object)
  out[:] = list(values)
  return out


def read_item(item: dict, fmt: str, image_column: str, key_column: Optional[str],
              storage_options: dict, allowed_roots: tuple[str, ...] | None = None) -> list[dict]:
  """One shard item {id, uris} → its rows (see `pgbatch.io.readers.read_shard`)."""
  from pgbatch.io import readers
  shard = readers.Shard(item["id"], tuple(item["uris"]))
  rows = readers.read_shard(shard, fmt, image_column=image_column, key_column=key_column,
                            storage_options=storage_options or None, allowed_roots=allowed_roots)
  now = time.time()
  for r in rows:
    r[READ_AT] = now
  return rows


def _pre_filter(policy_json: str):
  if policy_json not in _PRE_FILTERS:
    from pgbatch.safety.stages import PreFilter
    _PRE_FILTERS[policy_json] = PreFilter(json.loads(policy_json))
  return _PRE_FILTERS[policy_json]


def _decode(batch: dict, size: int, max_pixels: int, max_decoded_bytes: Optional[int] = None) -> dict:
  """decode_batch; if it raises (it should not), decode row by row so one bad row cannot sink the batch."""
  from pgbatch.io import decode
  try:
    return decode.decode_batch(batch, size, max_pixels, max_decoded_bytes)
  except Exception:  # noqa: BLE001 - isolate the failing rows below
    log.exception("decode_batch failed; retrying row by row")
  n = len(batch["key"])
  parts = []
  for i in range(n):
    row = {k: v[i:i + 1] for k, v in batch.items()}
    try:
      parts.append(decode.decode_batch(row, size, max_pixels, max_decoded_bytes))
    except Exception as e:  # noqa: BLE001
      row = dict(row)
      row["pixels"] = np.zeros((1, size, size, 3), np.uint8)
      row["width"] = np.array([-1], np.int32)
      row["height"] = np.array([-1], np.int32)
      row["sha256"] = _as_object([None])
      if row["status"][0] == "ok":
        row["status"] = _as_object(["error"])
        row["error"] = _as_object([error_json("decode", e)])
      parts.append(row)
  out = {}
  for k in parts[0]:
    arrays = [np.asarray(p[k]) for p in parts]
    out[k] = np.concatenate(arrays) if all(a.dtype != object for a in arrays) else _as_object(
        [x for a in arrays for x in a])
  return out


def decode_and_prefilter(batch: dict, size: int, max_pixels: int, policy_json: str,
                         max_decoded_bytes: Optional[int] = None) -> dict:
  """Reader rows → decoded pixels [B, size, size, 3] plus the image-safety verdict; image bytes dropped."""
  out = _decode(batch, size, max_pixels, max_decoded_bytes)
  try:
    out = _pre_filter(policy_json)(out)
  except Exception as e:  # noqa: BLE001 - PreFilter isolates filter failures; this is a last resort
    log.exception("image safety stage failed")
    status = np.asarray(out["status"], dtype=object).copy()
    err = np.asarray(out["error"], dtype=object).copy()
    for i in range(len(status)):
      if status[i] == "ok":
        status[i], err[i] = "error", error_json("safety", e, "image safety stage raised; row withheld")
    out["status"], out["error"] = status, err
  out.pop("image_bytes", None)
  # all-None object columns do not convert to Arrow cleanly inside Ray Data: "" stands for "no error" here
  out["error"] = _as_object(["" if e is None else str(e) for e in out["error"]])
  return out


def _error_struct(s: Any) -> Optional[dict]:
  if s is None or (isinstance(s, str) and not s) or (isinstance(s, float) and np.isnan(s)):
    return None
  if isinstance(s, dict):
    return s
  try:
    d = json.loads(s)
    return {"stage": d.get("stage"), "type": d.get("type"), "message": d.get("message")}
  except (TypeError, ValueError):
    return {"stage": "unknown", "type": "Error", "message": str(s)}


def _dim(v: Any) -> Optional[int]:
  try:
    v = int(v)
  except (TypeError, ValueError):
    return None
  return v if v >= 0 else None


def annotated_table(batch: dict, out: annotate.Annotated, widths, heights, provenance: dict) -> pa.Table:
  """Fixed columns (safety still null), one column per task, `safety_pre` and the internal columns."""
  n = len(out.status)
  cols = {
      "key": pa.array([str(k) for k in batch["key"]], pa.string()),
      "source_uri": pa.array([None if s is None else str(s) for s in batch["source_uri"]], pa.string()),
      "shard": pa.array([str(s) for s in batch["shard"]], pa.string()),
      "sha256": pa.array([None if s is None else str(s) for s in batch["sha256"]], pa.string()),
      "width": pa.array(widths, pa.int32()),
      "height": pa.array(heights, pa.int32()),
      "metadata": pa.array([None if m is None else str(m) for m in batch.get("metadata", [None] * n)], pa.string()),
      "status": pa.array(out.status, pa.string()),
      "error": pa.array([e if s == "error" else None for e, s in zip(out.errors, out.status)], schema.ERROR_TYPE),
      "provenance": pa.array([provenance] * n, schema.PROVENANCE_TYPE),
      "safety": pa.nulls(n, schema.SAFETY_TYPE),
  }
  fields = [schema.fixed_field(name) for name in cols] + [pa.field(name, col.type) for name, col in out.columns.items()]
  arrays = list(cols.values()) + list(out.columns.values())
  from pgbatch.safety.stages import PRE_COLUMN
  pre = batch.get(PRE_COLUMN)
  fields.append(pa.field(PRE_COLUMN, pa.string()))
  arrays.append(pa.array([None if p is None else str(p) for p in pre] if pre is not None else [None] * n,
                         pa.string()))
  fields.append(pa.field(SHARD_ROWS, pa.int64()))
  arrays.append(pa.array([int(x) for x in batch["shard_rows"]], pa.int64()))
  fields.append(pa.field(READ_AT, pa.float64()))
  arrays.append(pa.array([float(x) for x in batch[READ_AT]] if READ_AT in batch else [time.time()] * n,
                         pa.float64()))
  return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


class AnnotatorActor:
  """Annotate-stage actor around `annotate.Annotator` (one Engine, one model replica on this actor's devices).

  `__init__` loads (retried; a dead device exits so Ray replaces the actor) and starts compiling the full-batch
  programs in a thread while the first images are read; `__call__` maps a decoded numpy batch to a table.
  """

  def __init__(self, spec_json: str, provenance: dict):
    from pgbatch import config
    spec = config.JobSpec.model_validate_json(spec_json)
    res = spec.resources
    self.annotator, model = placement.init_with_retry(
        lambda: annotate.load(spec, provenance["model_variant"], is_fatal=placement.exit_if_fatal),
        retries=res.init_retries, backoff_s=res.init_backoff_s)
    self.provenance = dict(provenance, started_at=datetime.datetime.fromisoformat(provenance["started_at"]))
    self.provenance.update(model_variant=model.config.name, tokenizer_digest=self.annotator.tokenizer.digest,
                           checkpoint_digest=getattr(model.info, "digest", None) or provenance.get("checkpoint_digest"))
    self._warm = threading.Thread(target=self._warm_up, name="pgbatch-warm-up", daemon=True)
    self._warm.start()

  def _warm_up(self) -> None:
    try:
      self.annotator.warm_up()
    except Exception as e:  # noqa: BLE001 - real batches report their own errors
      placement.exit_if_fatal(e)
      log.warning("warm-up compile failed: %r", e)

  def __call__(self, batch: dict) -> pa.Table:
    self._warm.join()
    widths, heights = [_dim(w) for w in batch["width"]], [_dim(h) for h in batch["height"]]
    out = self.annotator(batch["pixels"], [str(s) for s in batch["status"]],
                         [_error_struct(e) for e in batch["error"]], widths, heights, batch.get("metadata"))
    return annotated_table(batch, out, widths, heights, self.provenance)


class SafetyPost:
  """Text-safety actor: `PostFilter` of the job, its filter models loaded once when the actor starts."""

  def __init__(self, spec_json: str):
    from pgbatch import config
    self.filter = config.JobSpec.model_validate_json(spec_json).post_filter()
    self.filters_info: Optional[list] = None
    self._info_error: Optional[BaseException] = None
    # models load in the background: the pipeline starts reading while they do (Ray Data waits for actors)
    self._loading = threading.Thread(target=self._load, name="pgbatch-safety-load", daemon=True)
    self._loading.start()

  def _load(self) -> None:
    for name in self.filter.names:
      try:
        self.filter.get(name)
      except Exception:  # noqa: BLE001 - PostFilter turns a filter that cannot load into error rows
        log.exception("safety filter %s failed to load", name)
    try:  # identity (name, version, model digest) of every enabled filter: provenance.safety_filters
      self.filters_info = self.filter.provenance_filters()
    except Exception as e:  # noqa: BLE001 - raised on the first batch
      self._info_error = e

  def with_filters(self, table: pa.Table) -> pa.Table:
    """provenance.safety_filters filled in (the Annotator leaves it empty)."""
    if self._info_error is not None:
      raise RuntimeError(f"cannot identify the safety filters for provenance: {self._info_error}")
    i = table.schema.get_field_index("provenance")
    if i < 0:
      return table
    rows = table.column(i).to_pylist()
    for r in rows:
      if r is not None:
        r["safety_filters"] = self.filters_info
    return table.set_column(i, schema.fixed_field("provenance"), pa.array(rows, schema.PROVENANCE_TYPE))

  def __call__(self, table: pa.Table) -> pa.Table:
    self._loading.join()
    try:
      return self.with_filters(self.filter(table))
    except Exception as e:  # noqa: BLE001 - PostFilter isolates filter failures; this is a last resort
      log.exception("text safety stage failed")
      n = table.num_rows
      status = table.column("status").to_pylist()
      errors = table.column("error").to_pylist()
      for i in range(n):
        if status[i] == "ok":
          status[i], errors[i] = "error", {"stage": "safety", "type": type(e).__name__,
                                           "message": "text safety stage raised; row withheld"}
      for name in self.filter.task_fields or []:
        if name in table.column_names:
          i = table.schema.get_field_index(name)
          table = table.set_column(i, table.schema.field(i), pa.nulls(n, table.schema.field(i).type))
      table = table.set_column(table.schema.get_field_index("status"), schema.fixed_field("status"),
                               pa.array(status, pa.string()))
      table = table.set_column(table.schema.get_field_index("error"), schema.fixed_field("error"),
                               pa.array(errors, schema.ERROR_TYPE))
      from pgbatch.safety.stages import PRE_COLUMN
      table = table.drop_columns([PRE_COLUMN]) if PRE_COLUMN in table.column_names else table
      return self.with_filters(table)


def decode_budget(spec) -> int:
  """decode.max_decoded_bytes, or by default what fits the decode tasks of the smallest Ray node at once."""
  import ray
  from pgbatch.io import decode
  if spec.decode.max_decoded_bytes is not None:
    return spec.decode.max_decoded_bytes
  return placement.decode_memory_budget(ray.nodes(), spec.resources.cpu_stage_cpus, decode.DECODE_PEAK_FACTOR)


def build_dataset(spec, items: list[dict], info: dict, provenance: dict, inherited_env: bool = False):
  """The Ray Data plan (lazy) over `items` ({id, uris} per shard). `inherited_env`: Ray workers inherit this
  process's environment (a local Ray started here)."""
  import warnings
  import ray
  from pgbatch.io import sources
  warnings.filterwarnings("ignore", message=r".*ray_remote_args.* is deprecated", category=DeprecationWarning)
  res = spec.resources
  placement.configure_data_context(ray.data.DataContext.get_current(), res)
  spec_json = spec.model_dump_json()
  policy_json = spec.safety.model_dump_json()
  cpu = float(res.cpu_stage_cpus)
  cpu_env = placement.stage_runtime_env(placement.cpu_stage_env(), inherited_env)
  ds = ray.data.from_items(items, override_num_blocks=len(items))
  ds = ds.flat_map(read_item, fn_kwargs=dict(fmt=spec.input.format, image_column=spec.input.image_column,
                                             key_column=spec.input.key_column,
                                             storage_options=dict(spec.input.storage_options),
                                             allowed_roots=sources.allowed_roots(spec.input.uri,
                                                                                 spec.input.allowed_sources)),
                   num_cpus=cpu, runtime_env=cpu_env, **RETRY_ARGS)
  ds = ds.map_batches(decode_and_prefilter, batch_size=spec.decode.batch_size, batch_format="numpy",
                      fn_kwargs=dict(size=info["image_size"], max_pixels=spec.decode.max_pixels,
                                     policy_json=policy_json, max_decoded_bytes=decode_budget(spec)),
                      num_cpus=cpu, runtime_env=cpu_env, **RETRY_ARGS)
  ds = ds.map_batches(AnnotatorActor, batch_size=res.batch_size, batch_format="numpy",
                      fn_constructor_kwargs=dict(spec_json=spec_json, provenance=provenance),
                      **placement.annotate_ray_args(res))
  ds = ds.map_batches(SafetyPost, batch_size=None, batch_format="pyarrow",
                      fn_constructor_kwargs=dict(spec_json=spec_json),
                      compute=ray.data.ActorPoolStrategy(min_size=1, max_size=res.safety_actors or 2 * res.actors),
                      num_cpus=cpu, runtime_env=cpu_env, max_restarts=-1,
                      max_task_retries=-1)
  return ds
