"""The driver: preflight (no Ray: input listed, output checked, model and tokenizer headers read) → the plan
(`plan.build_dataset`) → the commit loop (`commit`). Committed shards of earlier runs are skipped."""
from __future__ import annotations

import datetime
import logging
import time
import uuid

from pgbatch import placement
from pgbatch.pipeline import commit as commit_lib, plan as plan_lib
from pgbatch.pipeline.progress import PHASES, Progress, Summary

log = logging.getLogger(__name__)


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


def _provenance(spec, info: dict, run_id: str, started_at: datetime.datetime) -> dict:
  import pgbatch
  from pgbatch.redact import redact_uri
  return {"model_variant": info["model_variant"], "checkpoint_uri": redact_uri(spec.model.checkpoint),
          "checkpoint_digest": info["checkpoint_digest"], "tokenizer_digest": info["tokenizer_digest"],
          "pgbatch_version": pgbatch.__version__, "job_id": f"{spec.name}/{run_id}",
          "started_at": started_at.isoformat(), "safety_filters": []}  # filled by SafetyPost


def _start_ray(spec, start: float) -> bool:
  """A local Ray (its resources checked against the job) or the cluster of RAY_ADDRESS; True when local."""
  import ray
  inherited = placement.ensure_ray(spec.resources.accelerator)
  if inherited:
    placement.check_local_resources(spec, placement.ray_resources())
  log.info("ray ready after %.1f s", time.monotonic() - start)
  ctx = ray.data.DataContext.get_current()
  ctx.enable_progress_bars = False
  ctx.print_on_execution_start = False
  logging.getLogger("ray.data").setLevel(logging.WARNING)   # no per-run INFO chatter
  logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "progress bars disabled": ours
  return inherited


def _commit_loop(ds, spec, sink, info: dict, summary: Summary, bar: Progress, start: float,
                 buf: commit_lib.ShardBuffer, committed: set[str]) -> None:
  """Commits every shard as soon as all its rows arrived (ids into `committed`). Raises what Ray raises."""
  for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None, prefetch_batches=1):
    bar.update(images=batch.num_rows, shard_rows=dict(zip(batch.column("shard").to_pylist(),
                                                          batch.column(plan_lib.SHARD_ROWS).to_pylist())))
    for shard_id, table in buf.add(batch):
      read_at = commit_lib.pc_min(table.column(plan_lib.READ_AT))
      table = table.drop_columns(list(plan_lib.INTERNAL))
      stats = {"job": spec.name, "run_id": summary.run_id, "seconds": round(time.time() - read_at, 3),
               "model_variant": info["model_variant"], "checkpoint_digest": info["checkpoint_digest"]}
      try:
        uri = commit_lib.commit_with_retry(sink, shard_id, table, stats)
      except Exception as e:  # noqa: BLE001 - this shard stays uncommitted; the others go on
        buf.broken[shard_id] = f"commit failed: {type(e).__name__}: {e}"
        log.exception("shard %s: commit failed", shard_id)
        continue
      committed.add(shard_id)
      n = _count(summary, table, uri)
      bar.update(shards=1, done_images=n)
      log.info("committed %s (%d rows) at %.1f s", uri, n, time.monotonic() - start)


def _count(summary: Summary, table, uri: str) -> int:
  """Adds one committed shard's rows to the summary; returns its row count."""
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
  return len(st)


def run(spec, progress: bool = True, stream=None) -> Summary:
  """Runs the job; never raises for bad data. Raises `InputError` when the input matches no shards."""
  from pgbatch.io import sink as sink_lib
  from pgbatch.io.listing import check_output, list_inputs
  from pgbatch.redact import redact_uri
  start = time.monotonic()
  started_at = datetime.datetime.now(datetime.timezone.utc)
  run_id = started_at.strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]
  summary = Summary(job=spec.name, run_id=run_id, output_uri=redact_uri(spec.output.uri))
  shards = list_inputs(spec.input)
  check_output(spec.output.uri, dict(spec.output.storage_options) or None)
  sink = sink_lib.Sink(spec.output.uri, spec.output_schema(),
                       storage_options=dict(spec.output.storage_options) or None, job=spec.name)
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
  log.info("%d shard(s) to do, %d already committed; model %s", len(todo), summary.shards_skipped,
           info["model_variant"])
  bar = Progress(len(todo), enabled=progress, stream=stream, started=start)
  bar.phase(PHASES[1])
  try:
    inherited = _start_ray(spec, start)
    items = [{"id": s.id, "uris": list(s.uris)} for s in todo]
    ds = plan_lib.build_dataset(spec, items, info, _provenance(spec, info, run_id, started_at),
                                inherited_env=inherited)
  except BaseException:
    bar.cancel()
    raise
  bar.phase(PHASES[2])
  buf, committed_ids = commit_lib.ShardBuffer(), set()
  try:
    _commit_loop(ds, spec, sink, info, summary, bar, start, buf, committed_ids)
  except Exception as e:  # noqa: BLE001 - committed shards stay; the rest is redone by a rerun
    log.exception("pipeline failed")
    summary.failure = commit_lib.short_error(e)
  finally:
    bar.close()
  summary.annotate_rate, summary.phases = bar.rate(), {k: v for k, v in bar.phases.items() if k in PHASES}
  summary.shards_failed = [s.id for s in todo if s.id not in committed_ids]
  if summary.shards_failed and summary.failure is None:
    reasons = "; ".join(f"{k}: {v}" for k, v in list(buf.broken.items())[:3])
    summary.failure = f"{len(summary.shards_failed)} shard(s) not written" + (f" ({reasons})" if reasons else "")
  summary.seconds = time.monotonic() - start
  return summary
