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

from pgbatch import annotate, placement, rows, schema

log = logging.getLogger(__name__)
SHARD_ROWS = rows.SHARD_ROWS
READ_AT = rows.READ_AT     # epoch seconds when the shard was read (per-shard latency in the manifest)
COMPILES = (rows.COMPILES_WARM_UP, rows.COMPILES_MID_JOB)  # the annotate actors' XLA compiles (summed by the driver)
INTERNAL = (SHARD_ROWS, READ_AT, *COMPILES)
# Read/decode tasks: an exception that escapes them (a transient I/O error; bad data becomes error rows) is
# retried a few times before the run fails; the shard is then redone by the next run.
RETRY_ARGS = {"max_retries": 5, "retry_exceptions": True}
_PRE_FILTERS: dict[str, Any] = {}   # per worker process: policy JSON -> PreFilter (models load once)


def read_items(items: pa.Table, fmt: str, image_column: str, key_column: Optional[str],
               storage_options: dict, allowed_roots: tuple[str, ...] | None = None) -> pa.Table:
  """Shard items {id, uris, skip} → their rows (see `pgbatch.io.readers.read_shard`), typed by `rows.to_table`.
  `skip`: keys a retried shard keeps from its committed file (`pgbatch.io.resume`); they are not read again."""
  from pgbatch.io import readers
  out: list[dict] = []
  for item in items.to_pylist():
    shard = readers.Shard(item["id"], tuple(item["uris"]))
    got = readers.read_shard(shard, fmt, image_column=image_column, key_column=key_column,
                             storage_options=storage_options or None, allowed_roots=allowed_roots)
    skip = set(item.get("skip") or ())
    if skip:   # --retry-errors: only the rows that were errors (and any new ones) are annotated again
      got = [r for r in got if r[rows.KEY] not in skip]
      for r in got:
        r[rows.SHARD_ROWS] = len(got)
    out += got
  now = time.time()
  names = list(out[0]) if out else [rows.KEY]
  cols = {name: [r[name] for r in out] for name in names}
  cols[READ_AT] = [now] * len(out)
  return rows.to_table(cols)


def _pre_filter(policy_json: str):
  if policy_json not in _PRE_FILTERS:
    from pgbatch.safety.stages import PreFilter
    _PRE_FILTERS[policy_json] = PreFilter(json.loads(policy_json))
  return _PRE_FILTERS[policy_json]


DECODED = (rows.PIXELS, rows.WIDTH, rows.HEIGHT, rows.SHA256, rows.STATUS, rows.ERROR)


def _decode(batch: dict, size: int, max_pixels: int, max_decoded_bytes: Optional[int] = None) -> dict:
  """decode_batch, its unexpected failures isolated to the rows that cause them (those become error rows)."""
  from pgbatch.io import decode
  n = len(batch[rows.KEY])

  def part(idx: list[int]) -> list[tuple]:
    out = decode.decode_batch({k: np.asarray(v)[idx] for k, v in batch.items()}, size, max_pixels,
                              max_decoded_bytes)
    return list(zip(*(out[c] for c in DECODED)))

  done, failed = rows.isolate(part, range(n))
  out = dict(batch)
  out[rows.PIXELS] = np.zeros((n, size, size, 3), np.uint8)
  out[rows.WIDTH] = np.full((n,), -1, np.int32)
  out[rows.HEIGHT] = np.full((n,), -1, np.int32)
  out[rows.SHA256] = rows.as_object([None] * n)
  status, errors = list(batch[rows.STATUS]), list(batch[rows.ERROR])
  for i, values in done.items():
    for c, v in zip(DECODED[:4], values):
      out[c][i] = v
    status[i], errors[i] = values[-2], values[-1]
  for i, e in failed.items():
    log.error("decoding row %s raised %r", batch[rows.KEY][i], e)
    rows.mark_error(status, errors, i, rows.error("decode", e))
  out[rows.STATUS], out[rows.ERROR] = rows.as_object(status), rows.as_object(errors)
  return out


def decode_and_prefilter(batch: dict, size: int, max_pixels: int, policy_json: str,
                         max_decoded_bytes: Optional[int] = None) -> pa.Table:
  """Reader rows → decoded pixels [B, size, size, 3] plus the image-safety verdict; image bytes dropped."""
  from ray.data.extensions import ArrowTensorArray
  out = _decode(batch, size, max_pixels, max_decoded_bytes)
  try:
    out = _pre_filter(policy_json)(out)
  except Exception as e:  # noqa: BLE001 - PreFilter isolates filter failures; this is a last resort
    log.exception("image safety stage failed")
    status, errors = list(out[rows.STATUS]), list(out[rows.ERROR])
    for i in range(len(status)):
      rows.mark_error(status, errors, i, rows.error("safety", e, "image safety stage raised; row withheld"))
    out[rows.STATUS], out[rows.ERROR] = status, errors
  out.pop(rows.IMAGE_BYTES, None)
  out[rows.PIXELS] = ArrowTensorArray.from_numpy(np.ascontiguousarray(out[rows.PIXELS]))
  return rows.to_table(out)


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
      "safety": rows.null_column(schema.SAFETY_TYPE, n),
  }
  fields = [schema.fixed_field(name) for name in cols] + [pa.field(name, col.type) for name, col in out.columns.items()]
  arrays = list(cols.values()) + list(out.columns.values())
  from pgbatch.safety.stages import PRE_COLUMN
  pre = batch.get(PRE_COLUMN)
  fields.append(pa.field(PRE_COLUMN, pa.string()))
  arrays.append(pa.array([None if p is None else str(p) for p in pre] if pre is not None else [None] * n,
                         pa.string()))
  fields.append(pa.field(SHARD_ROWS, pa.int64()))
  arrays.append(pa.array([int(x) for x in batch[SHARD_ROWS]], pa.int64()))
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
                         [e if isinstance(e, dict) else None for e in batch[rows.ERROR]], widths, heights,
                         batch.get("metadata"))
    table = annotated_table(batch, out, widths, heights, self.provenance)
    return with_compile_counts(table, self.annotator.engine.take_compile_counts())


def with_compile_counts(table: pa.Table, counts: tuple[int, int]) -> pa.Table:
  """`COMPILES` columns: (warm-up, mid-job) XLA compiles on the first row, 0 on the others (so their sums over
  every row of the job are the actors' compiles)."""
  for name, count in zip(COMPILES, counts):
    col = [0] * table.num_rows
    if col:
      col[0] = int(count)
    table = table.append_column(pa.field(name, pa.int64()), pa.array(col, pa.int64()))
  return table


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
      status = table.column("status").to_pylist()
      errors = table.column("error").to_pylist()
      for i in range(table.num_rows):
        rows.mark_error(status, errors, i, rows.error("safety", e, "text safety stage raised; row withheld"))
      withheld = [st != rows.OK for st in status]
      for name in self.filter.task_fields or []:
        if name in table.column_names:
          i = table.schema.get_field_index(name)
          table = table.set_column(i, table.schema.field(i), rows.withhold(table.column(i), withheld))
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
  ds = ds.map_batches(read_items, batch_size=1, batch_format="pyarrow",
                      fn_kwargs=dict(fmt=spec.input.format, image_column=spec.input.image_column,
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
