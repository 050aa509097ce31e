"""The Ray Data pipeline: a JobSpec → typed Parquet, one file per input shard, resumable.

    summary = pipeline.run(config.load("job.yaml"))

Driver (this process): list shards → drop shards already committed in the output manifest → build the plan:

  from_items(one item per shard)                 one block per shard
  → flat_map(read)                               rows {key, shard, source_uri, image_bytes, metadata, status, …}
  → map_batches(decode + safety pre)             CPU tasks (fused): pixels uint8 [B, R, R, 3], width, height,
                                                 sha256; image filters may set status filtered/error
  → map_batches(Annotator)                       actor pool per `pgbatch.placement`: the Engine encodes each
                                                 image once for all tasks; parse → typed task columns;
                                                 the full-batch programs compile in a thread at start-up
  → map_batches(SafetyPost)                      CPU actors: text filters, policy, `safety` column,
                                                 provenance.safety_filters; models load in a thread
  → driver iter_batches                          rows buffered per shard until all `shard_rows` arrived,
                                                 then `Sink.commit_shard` (atomic; manifest entry)

Every row read comes out exactly once: stages never drop rows (failures become status "error" with the
stage and reason), and a shard is written only when all of its rows arrived. A crash loses only the shards
not yet committed; a rerun redoes exactly those. This is the only module that imports `ray.data`.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import sys
import threading
import time
import uuid
from typing import Any, Optional

import numpy as np
import pyarrow as pa

from pgbatch import placement, schema
from pgbatch.io.listing import check_output  # noqa: F401  (pipeline.check_output: refused before any work)
from pgbatch.progress import PHASES, Progress, fmt_s as _fmt_s  # noqa: F401  (Progress: public here)

log = logging.getLogger(__name__)
SHARD_ROWS = "_shard_rows"
READ_AT = "_read_at"     # epoch seconds when the shard was read (per-shard latency in the manifest)
INTERNAL = (SHARD_ROWS, READ_AT)
PROMPT_CACHE_SIZE = 4096
# Read/decode tasks: an exception that escapes them (a transient I/O error; bad data becomes error rows) is
# retried a few times before the run fails; the shard is then redone by the next run.
RETRY_ARGS = {"max_retries": 5, "retry_exceptions": True}


# --- summary -----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Summary:
  """What one `run` did. `images`: rows written by this run (`ok + error + filtered`)."""
  job: str
  run_id: str
  output_uri: str
  shards_total: int = 0
  shards_skipped: int = 0       # already committed by an earlier run
  shards_committed: int = 0     # committed by this run
  shards_failed: list = dataclasses.field(default_factory=list)  # shard ids not committed by this run
  images: int = 0
  ok: int = 0
  error: int = 0
  filtered: int = 0
  seconds: float = 0.0
  files: list = dataclasses.field(default_factory=list)
  failure: Optional[str] = None   # why the run stopped early, if it did
  reasons: dict = dataclasses.field(default_factory=dict)  # "stage/type" -> error rows written by this run
  annotate_rate: Optional[float] = None  # images/s of annotating (pgbatch.progress); None under two batches
  phases: dict = dataclasses.field(default_factory=dict)   # phase name -> seconds (pgbatch.progress.PHASES)

  @property
  def success(self) -> bool:
    return self.failure is None and not self.shards_failed

  def reasons_line(self, top: int = 5) -> str:
    """`errors: decode/TruncatedImageError 3, read/ReadError 1` (most frequent first), or ""."""
    if not self.reasons:
      return ""
    items = sorted(self.reasons.items(), key=lambda kv: (-kv[1], kv[0]))
    more = f", … ({len(items) - top} more)" if len(items) > top else ""
    return "errors: " + ", ".join(f"{k} {n}" for k, n in items[:top]) + more

  def line(self) -> str:
    """The run in one line; the two rates are labelled: annotating (steady state) and wall-clock (whole run)."""
    rate = self.images / self.seconds if self.seconds > 0 else 0.0
    skipped = f", {self.shards_skipped} already done" if self.shards_skipped else ""
    failed = f", {len(self.shards_failed)} FAILED" if self.shards_failed else ""
    annotating = f"{self.annotate_rate:.2f} images/s annotating, " if self.annotate_rate is not None else ""
    return (f"pgbatch: {self.job}: {self.images} images (ok {self.ok}, error {self.error}, filtered "
            f"{self.filtered}) in {self.shards_committed}/{self.shards_total} shards{skipped}{failed}, "
            f"{self.seconds:.1f} s, {annotating}{rate:.2f} images/s wall-clock → {self.output_uri}")

  def phases_line(self) -> str:
    """`phases: listing input 0:00, starting Ray 0:04, …` or "" when nothing ran."""
    return ("phases: " + ", ".join(f"{k} {_fmt_s(v)}" for k, v in self.phases.items())) if self.phases else ""


# --- stage helpers (run in Ray workers; pure functions of their inputs) ------------------------------------


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


_PRE_FILTERS: dict[str, Any] = {}   # per worker process: policy JSON -> PreFilter (models load once)


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


def question_fields(metadata: Optional[str]) -> dict:
  """The fields an answer task's `question_field` is looked up in: the row's metadata (Parquet: the other
  columns) merged over the fields of a WebDataset `.json` sidecar (kept under "json" by the reader)."""
  try:
    meta = json.loads(metadata) if metadata else {}
  except (TypeError, ValueError):
    return {}
  if not isinstance(meta, dict):
    return {}
  sidecar = meta.get("json")
  return {**sidecar, **meta} if isinstance(sidecar, dict) else meta


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


class Annotator:
  """Annotate-stage actor: one Engine (one PaliGemma replica on this actor's devices) for all tasks.

  Input: decoded numpy batch. Output: pyarrow Table with the fixed columns (safety still null), one column
  per task, `safety_pre` and `_shard_rows`. Rows that are not `ok` pass through with null task columns.
  A failing batch is retried row by row; a row that still fails becomes an error row (stage "annotate").
  """

  def __init__(self, spec_json: str, provenance: dict):
    from pgbatch import config
    spec = config.JobSpec.model_validate_json(spec_json)
    res = spec.resources
    self.spec = spec
    self.provenance = dict(provenance)
    self.provenance["started_at"] = datetime.datetime.fromisoformat(provenance["started_at"])
    placement.init_with_retry(self._load, retries=res.init_retries, backoff_s=res.init_backoff_s)
    # compile the full-batch programs while the first images are still being read and decoded
    self._warm = threading.Thread(target=self._warm_up, name="pgbatch-warm-up", daemon=True)
    self._warm.start()

  def _warm_up(self) -> None:
    try:
      b, r = self.engine.batch_size, self.engine.image_size
      prompts = {t.name: [self._tokens(t.prompt({t.question_field: "what is this?"} if t.question_field else None))] * b
                 for t in self.tasks}
      self.engine.annotate(np.zeros((b, r, r, 3), np.uint8), prompts, {t.name: t.max_new_tokens for t in self.tasks})
    except Exception as e:  # noqa: BLE001 - real batches report their own errors
      placement.exit_if_fatal(e)
      log.warning("warm-up compile failed: %r", e)

  def _load(self) -> None:
    import jax
    from pgbatch import model as model_lib, tokenizer
    from pgbatch.engine import Engine
    spec = self.spec
    mesh = None
    devices = jax.devices()
    if spec.resources.accelerator != "cpu" and len(devices) > 1:
      variant = spec.model.variant or self.provenance["model_variant"]
      data, model = placement.mesh_shape(len(devices), variant, accelerator_kind=spec.resources.accelerator)
      mesh = model_lib.make_mesh(data, model)
    self.tokenizer = tokenizer.load(spec.model.tokenizer)
    self.model = model_lib.load(spec.model.checkpoint, dtype=spec.model.dtype, mesh=mesh, variant=spec.model.variant)
    vae = None
    if any(t.kind == "segment" for t in spec.tasks):
      from pgbatch.model import vqvae
      vae = vqvae.load(spec.model.vae)
    self.tasks = spec.task_objects(vae=vae)
    self.engine = Engine(self.model, batch_size=spec.resources.batch_size)
    self.provenance.update(model_variant=self.model.config.name, tokenizer_digest=self.tokenizer.digest,
                           checkpoint_digest=getattr(self.model.info, "digest", None) or
                           self.provenance.get("checkpoint_digest"))
    self.prompt_cache: dict[str, list[int]] = {}

  def _tokens(self, text: str) -> list[int]:
    """Cached prompt ids; safe when two batches run on two threads (resources.concurrent_batches)."""
    ids = self.prompt_cache.get(text)
    if ids is None:
      if len(self.prompt_cache) >= PROMPT_CACHE_SIZE:  # per-image questions: keep the cache bounded
        self.prompt_cache.clear()
      ids = self.prompt_cache[text] = self.tokenizer.encode_prompt(text)
    return ids

  def _prompts(self, metadata: list[str], live: list[int], status, errors) -> tuple[dict, list[int]]:
    """Prompt texts per task for the live rows; rows whose prompt cannot be built become errors."""
    from pgbatch.tasks import PromptError
    texts = {t.name: [] for t in self.tasks}
    keep = []
    for i in live:
      meta = None
      row = {}
      try:
        for t in self.tasks:
          if t.question_field is not None and meta is None:
            meta = question_fields(metadata[i] if metadata is not None else None)
          row[t.name] = t.prompt(meta)
      except (PromptError, ValueError) as e:
        status[i], errors[i] = "error", {"stage": "annotate", "type": type(e).__name__, "message": str(e)}
        continue
      keep.append(i)
      for name, p in row.items():
        texts[name].append(p)
    return texts, keep

  def _annotate(self, pixels: np.ndarray, widths, heights, prompt_texts: dict) -> dict[str, list]:
    """pixels uint8 [n, R, R, 3] → task name → n parsed values."""
    prompts = {name: [self._tokens(p) for p in texts] for name, texts in prompt_texts.items()}
    max_new = {t.name: t.max_new_tokens for t in self.tasks}
    tokens = self.engine.annotate(pixels, prompts, max_new)
    from pgbatch.model import EOS
    out = {}
    for t in self.tasks:
      rows = tokens[t.name]
      texts = [self.tokenizer.decode(r) for r in rows]
      num = [len(r) for r in rows]
      truncated = [not (r and r[-1] == EOS) and len(r) >= t.max_new_tokens for r in rows]
      out[t.name] = t.parse_batch(texts, num, truncated, widths, heights, prompt_texts[t.name])
    return out

  def _annotate_isolating(self, idx: list[int], pixels, widths, heights, prompt_texts, status, errors,
                          results) -> None:
    """Annotates rows `idx`; on failure halves the batch until the failing rows are found."""
    try:
      values = self._annotate(pixels[idx], [widths[i] for i in idx], [heights[i] for i in idx],
                              {k: [v[i] for i in idx] for k, v in prompt_texts.items()})
    except Exception as e:  # noqa: BLE001
      placement.exit_if_fatal(e)
      if len(idx) == 1:
        log.warning("annotation failed for one row: %r", e)
        status[idx[0]] = "error"
        errors[idx[0]] = {"stage": "annotate", "type": type(e).__name__, "message": str(e)[:2000]}
        return
      half = len(idx) // 2
      for part in (idx[:half], idx[half:]):
        self._annotate_isolating(part, pixels, widths, heights, prompt_texts, status, errors, results)
      return
    for name, vals in values.items():
      for i, v in zip(idx, vals):
        results[name][i] = v

  def __call__(self, batch: dict) -> pa.Table:
    self._warm.join()
    n = len(batch["key"])
    status = [str(s) for s in batch["status"]]
    errors = [_error_struct(e) for e in batch["error"]]
    widths = [_dim(w) for w in batch["width"]]
    heights = [_dim(h) for h in batch["height"]]
    live = [i for i in range(n) if status[i] == "ok"]
    results: dict[str, list] = {t.name: [None] * n for t in self.tasks}
    if live:
      texts, live = self._prompts(list(batch.get("metadata", [None] * n)), live, status, errors)
      by_pos = {name: dict(zip(live, vals)) for name, vals in texts.items()}
      prompt_texts = {name: [d.get(i) for i in range(n)] for name, d in by_pos.items()}
      if live:
        pixels = np.asarray(batch["pixels"])
        self._annotate_isolating(live, pixels, [w or 1 for w in widths], [h or 1 for h in heights],
                                 prompt_texts, status, errors, results)
    return self.table(batch, status, errors, widths, heights, results)

  def table(self, batch, status, errors, widths, heights, results) -> pa.Table:
    n = len(status)
    cols = {
        "key": pa.array([str(k) for k in batch["key"]], pa.string()),
        "source_uri": pa.array([None if s is None else str(s) for s in batch["source_uri"]], pa.string()),
        "shard": pa.array([str(s) for s in batch["shard"]], pa.string()),
        "sha256": pa.array([None if s is None else str(s) for s in batch["sha256"]], pa.string()),
        "width": pa.array(widths, pa.int32()),
        "height": pa.array(heights, pa.int32()),
        "metadata": pa.array([None if m is None else str(m) for m in batch.get("metadata", [None] * n)], pa.string()),
        "status": pa.array(status, pa.string()),
        "error": pa.array([e if s == "error" else None for e, s in zip(errors, status)], schema.ERROR_TYPE),
        "provenance": pa.array([self.provenance] * n, schema.PROVENANCE_TYPE),
        "safety": pa.nulls(n, schema.SAFETY_TYPE),
    }
    fields = [schema.fixed_field(name) for name in cols]
    arrays = list(cols.values())
    for t in self.tasks:
      fields.append(pa.field(t.name, t.arrow_type))
      arrays.append(pa.array(results[t.name], t.arrow_type))
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


# --- driver ------------------------------------------------------------------------------------------------


def ensure_ray(accelerator: str = "cpu", num_cpus: Optional[int] = None) -> bool:
  """Starts a local Ray (or connects to RAY_ADDRESS) unless one is initialized. Returns True when this
  process started a local Ray, whose workers therefore inherit this process's environment."""
  import ray
  if ray.is_initialized():
    return False
  address = os.environ.get("RAY_ADDRESS") or "local"
  kwargs = dict(address=address, include_dashboard=False, logging_level=logging.WARNING,
                configure_logging=True, log_to_driver=True)
  if address == "local":
    # at least 2 logical CPUs: the annotate actor takes 1, the CPU stages share the other
    kwargs["num_cpus"] = num_cpus or max(os.cpu_count() or 1, 2)
    if accelerator == "cpu":  # every stage wants JAX on the CPU: workers inherit it, no per-stage env needed
      os.environ.setdefault("JAX_PLATFORMS", "cpu")
  if address == "local":
    del kwargs["address"]
    placement.start_local_ray(**kwargs)  # loopback only, token auth
  else:
    ray.init(**kwargs)
  return address == "local"


class ResourceError(RuntimeError):
  """The local Ray cannot host the job's actors (it would wait for them until wait_for_actors_s)."""


def check_local_resources(spec, available: dict) -> None:
  """For a local Ray started here: fail at once when the annotate actors cannot all be placed."""
  res = spec.resources
  need = {"CPU": res.actors * res.num_cpus + 2 * res.cpu_stage_cpus}
  if res.accelerator == "gpu":
    need["GPU"] = res.actors * res.chips_per_actor
  elif res.accelerator == "tpu":
    need["TPU"] = res.actors * res.chips_per_actor
  short = {k: (v, float(available.get(k, 0))) for k, v in need.items() if float(available.get(k, 0)) + 1e-9 < v}
  if short:
    what = ", ".join(f"{k}: needs {v:g}, this machine has {a:g}" for k, (v, a) in short.items())
    raise ResourceError(f"resources: the local Ray cannot place {res.actors} {res.accelerator} annotate actor(s) "
                        f"({what}); lower resources.actors / chips_per_actor / num_cpus, or run on a cluster "
                        "(RAY_ADDRESS)")


def _runtime_env(env: dict, inherited: bool) -> Optional[dict]:
  """`env` unless every variable already has that value in workers that inherit this process's environment
  (then workers Ray prestarted can run the stage instead of fresh processes: seconds saved per stage)."""
  if inherited and all(os.environ.get(k) == v for k, v in (env.get("env_vars") or {}).items()) and set(env) <= {
      "env_vars"}:
    return None
  return env


def ray_resources() -> dict:
  import ray
  return ray.cluster_resources()


class SafetyListError(ValueError):
  """The job's hash list cannot be read or parsed (checked before any work: it would fail every row)."""


def plan_info(spec) -> dict:
  """Model facts the driver needs before Ray starts: image size, variant, checkpoint digest (from the file
  headers, no weights read). Also loads the tokenizer and the safety hash list and, for segment tasks, checks
  the VQ-VAE file exists, so a wrong path fails here with the path instead of in every actor."""
  import fsspec
  from pgbatch import checkpoints, tokenizer
  try:
    ckpt = checkpoints.open_checkpoint(spec.model.checkpoint, variant=spec.model.variant)
  except (checkpoints.CheckpointError, OSError) as e:
    raise checkpoints.CheckpointError(f"model.checkpoint: {e}") from None
  cfg = ckpt.config
  try:
    tok = tokenizer.load(spec.model.tokenizer)
  except tokenizer.TokenizerError as e:
    raise tokenizer.TokenizerError(f"model.tokenizer: {e}") from None
  if spec.model.vae:
    fs, path = fsspec.core.url_to_fs(spec.model.vae)
    if not fs.exists(path):
      raise FileNotFoundError(f"model.vae: {spec.model.vae} not found")
  if spec.safety.hashlist.enabled:
    from pgbatch.safety.registry import load_filter
    try:
      load_filter("hashlist", spec.safety)
    except Exception as e:  # noqa: BLE001 - any failure here would otherwise make every row an error row
      raise SafetyListError(f"safety.hashlist.uri: {spec.safety.hashlist.uri}: {type(e).__name__}: {e}") from None
  return {"image_size": int(cfg.image_size), "model_variant": cfg.name, "checkpoint_digest": ckpt.info.digest,
          "tokenizer_digest": tok.digest}


class ShardBuffer:
  """Driver side: collects rows per shard until all `_shard_rows` rows of a shard arrived.

  `add(table)` returns the shards it completed, as (shard id, table with every row of the shard). A shard that
  gets more rows than were read, or rows after it completed, goes to `broken` and is never returned (a rerun
  redoes it): nothing is written twice.
  """

  def __init__(self):
    self.pending: dict[str, list[pa.Table]] = {}
    self.counts: dict[str, int] = {}
    self.complete: list[str] = []
    self.broken: dict[str, str] = {}

  def add(self, table: pa.Table) -> list[tuple[str, pa.Table]]:
    out = []
    for shard_id, part in _group_by_shard(table).items():
      if shard_id in self.broken:
        continue
      if shard_id in self.complete:
        self._break(shard_id, "rows arrived after the shard was complete")
        continue
      self.pending.setdefault(shard_id, []).append(part)
      self.counts[shard_id] = self.counts.get(shard_id, 0) + part.num_rows
      expected = int(part.column(SHARD_ROWS)[0].as_py())
      if self.counts[shard_id] > expected:
        self._break(shard_id, f"{self.counts[shard_id]} rows arrived for {expected} read")
      elif self.counts[shard_id] == expected:
        self.complete.append(shard_id)
        out.append((shard_id, pa.concat_tables(self.pending.pop(shard_id))))
    return out

  def _break(self, shard_id: str, why: str) -> None:
    log.error("shard %s: %s; not written", shard_id, why)
    self.broken[shard_id] = why
    self.pending.pop(shard_id, None)


def short_error(e: BaseException, limit: int = 500) -> str:
  """`Type: message` with a remote traceback (Ray task errors carry one) reduced to its last line."""
  lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
  text = f"{type(e).__name__}: {lines[-1] if lines else ''}"
  return text if len(text) <= limit else text[:limit - 1] + "…"


def commit_with_retry(sink, shard_id: str, table: pa.Table, stats: dict, attempts: int = 3,
                      backoff_s: float = 2.0) -> str:
  """Sink.commit_shard with retries (object stores have transient errors); a data error is not retried."""
  for attempt in range(attempts):
    try:
      return sink.commit_shard(shard_id, table, stats)
    except (ValueError, TypeError, pa.ArrowInvalid):
      raise
    except Exception as e:  # noqa: BLE001 - I/O of any fsspec backend
      if attempt == attempts - 1:
        raise
      log.warning("commit of %s failed (attempt %d/%d): %r", shard_id, attempt + 1, attempts, e)
      time.sleep(backoff_s * 2 ** attempt)
  raise AssertionError("unreachable")


def pc_min(col) -> float:
  import pyarrow.compute as pc
  v = pc.min(col).as_py()
  return time.time() if v is None else float(v)


def _group_by_shard(table: pa.Table) -> dict[str, pa.Table]:
  shards = table.column("shard").to_pylist()
  idx: dict[str, list[int]] = {}
  for i, s in enumerate(shards):
    idx.setdefault(s, []).append(i)
  if len(idx) == 1:
    return {shards[0]: table}
  return {s: table.take(pa.array(rows, pa.int64())) for s, rows in idx.items()}


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
  cpu_env = _runtime_env(placement.cpu_stage_env(), inherited_env)
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
  ds = ds.map_batches(Annotator, batch_size=res.batch_size, batch_format="numpy",
                      fn_constructor_kwargs=dict(spec_json=spec_json, provenance=provenance),
                      **placement.annotate_ray_args(res))
  ds = ds.map_batches(SafetyPost, batch_size=None, batch_format="pyarrow",
                      fn_constructor_kwargs=dict(spec_json=spec_json),
                      compute=ray.data.ActorPoolStrategy(min_size=1, max_size=res.safety_actors or 2 * res.actors),
                      num_cpus=cpu, runtime_env=cpu_env, max_restarts=-1,
                      max_task_retries=-1)
  return ds


def run(spec, progress: bool = True, stream=None) -> Summary:
  """Runs the job; never raises for bad data. Raises `InputError` when the input matches no shards."""
  from pgbatch.io import readers, sink as sink_lib
  from pgbatch.redact import redact_uri
  import pgbatch
  start = time.monotonic()
  started_at = datetime.datetime.now(datetime.timezone.utc)
  run_id = started_at.strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]
  summary = Summary(job=spec.name, run_id=run_id, output_uri=redact_uri(spec.output.uri))
  from pgbatch.io.listing import list_inputs
  shards = list_inputs(spec.input)
  check_output(spec.output.uri, dict(spec.output.storage_options) or None)
  out_schema = spec.output_schema()
  sink = sink_lib.Sink(spec.output.uri, out_schema, storage_options=dict(spec.output.storage_options) or None,
                       job=spec.name)
  removed = sink.cleanup()
  if removed:
    log.warning("removed %d leftover file(s) of an interrupted run: %s", len(removed), ", ".join(removed[:5]))
  committed = sink.committed()
  todo = [s for s in shards if s.id not in committed]
  summary.shards_total, summary.shards_skipped = len(shards), len(shards) - len(todo)
  if not todo:
    summary.seconds = time.monotonic() - start
    return summary
  info = plan_info(spec)
  provenance = {"model_variant": info["model_variant"], "checkpoint_uri": redact_uri(spec.model.checkpoint),
                "checkpoint_digest": info["checkpoint_digest"], "tokenizer_digest": info["tokenizer_digest"],
                "pgbatch_version": pgbatch.__version__, "job_id": f"{spec.name}/{run_id}",
                "started_at": started_at.isoformat(), "safety_filters": []}  # filled by SafetyPost
  log.info("%d shard(s) to do, %d already committed; model %s", len(todo), summary.shards_skipped,
           info["model_variant"])
  bar = Progress(len(todo), enabled=progress, stream=stream, started=start)
  bar.phase(PHASES[1])
  try:
    inherited = ensure_ray(spec.resources.accelerator)
    if inherited:
      check_local_resources(spec, ray_resources())
    log.info("ray ready after %.1f s", time.monotonic() - start)
    import ray
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)   # no per-run INFO chatter
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "progress bars disabled": ours
    items = [{"id": s.id, "uris": list(s.uris)} for s in todo]
    ds = build_dataset(spec, items, info, provenance, inherited_env=inherited)
  except BaseException:
    bar.cancel()
    raise
  bar.phase(PHASES[2])
  shards_buf = ShardBuffer()
  committed_ids: set[str] = set()
  try:
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None, prefetch_batches=1):
      bar.update(images=batch.num_rows, shard_rows=dict(zip(batch.column("shard").to_pylist(),
                                                            batch.column(SHARD_ROWS).to_pylist())))
      for shard_id, table in shards_buf.add(batch):
        read_at = pc_min(table.column(READ_AT))
        table = table.drop_columns(list(INTERNAL))
        stats = {"job": spec.name, "run_id": run_id, "seconds": round(time.time() - read_at, 3),
                 "model_variant": info["model_variant"], "checkpoint_digest": info["checkpoint_digest"]}
        try:
          uri = commit_with_retry(sink, shard_id, table, stats)
        except Exception as e:  # noqa: BLE001 - this shard stays uncommitted; the others go on
          shards_buf.broken[shard_id] = f"commit failed: {type(e).__name__}: {e}"
          log.exception("shard %s: commit failed", shard_id)
          continue
        committed_ids.add(shard_id)
        st = table.column("status").to_pylist()
        for s_, e_ in zip(st, table.column("error").to_pylist()):
          if s_ == "error" and e_:
            reason = f"{e_.get('stage')}/{e_.get('type')}"
            summary.reasons[reason] = summary.reasons.get(reason, 0) + 1
        summary.ok += st.count("ok")
        summary.error += st.count("error")
        summary.filtered += st.count("filtered")
        summary.images += len(st)
        summary.shards_committed += 1
        summary.files.append(uri)
        bar.update(shards=1, done_images=len(st))
        log.info("committed %s (%d rows) at %.1f s", uri, len(st), time.monotonic() - start)
  except Exception as e:  # noqa: BLE001 - committed shards stay; the rest is redone by a rerun
    log.exception("pipeline failed")
    summary.failure = short_error(e)
  finally:
    bar.close()
  summary.annotate_rate, summary.phases = bar.rate(), {k: v for k, v in bar.phases.items() if k in PHASES}
  summary.shards_failed = [s.id for s in todo if s.id not in committed_ids]
  if summary.shards_failed and summary.failure is None:
    reasons = "; ".join(f"{k}: {v}" for k, v in list(shards_buf.broken.items())[:3])
    summary.failure = f"{len(summary.shards_failed)} shard(s) not written" + (f" ({reasons})" if reasons else "")
  summary.seconds = time.monotonic() - start
  return summary
