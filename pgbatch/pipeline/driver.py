"""The driver: preflight (no Ray: input listed, output checked, model and tokenizer headers read) → the plan
(`plan.build_dataset`) → the commit loop (`commit`). Committed shards of earlier runs are skipped."""
from __future__ import annotations

import dataclasses
import datetime
import logging
import time
import uuid
from typing import Optional

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
                 buf: commit_lib.ShardBuffer, committed: set[str], work, held) -> None:
  """Commits every shard as soon as all its rows arrived (ids into `committed`); a shard whose error rows were
  retried is merged with the kept rows of its committed file. Raises what Ray raises, and `lease.LeaseLost`."""
  from pgbatch.io import resume
  by_id = {s.id: s for s in work.todo}
  out_opts = dict(spec.output.storage_options) or None
  for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None, prefetch_batches=1):
    bar.update(images=batch.num_rows, shard_rows=dict(zip(batch.column("shard").to_pylist(),
                                                          batch.column(plan_lib.SHARD_ROWS).to_pylist())))
    summary.count_compiles(*(batch.column(c) for c in plan_lib.COMPILES))
    for shard_id, table in buf.add(batch):
      held.check()
      shard = by_id[shard_id]
      read_at = commit_lib.pc_min(table.column(plan_lib.READ_AT))
      table = table.drop_columns(list(plan_lib.INTERNAL))
      stats = {"job": spec.name, "run_id": summary.run_id, "seconds": round(time.time() - read_at, 3),
               "model_variant": info["model_variant"], "checkpoint_digest": info["checkpoint_digest"]}
      where = ({"sources": list(shard.uris)} if spec.input.format == "images"
               else {"input_version": shard.version})
      try:
        whole = table
        if shard_id in work.skip_keys:
          whole = resume.merge_retried(work.retried[shard_id], table, sink.schema, out_opts)
        uri = commit_lib.commit_with_retry(sink, shard_id, whole, stats, **where)
      except Exception as e:  # noqa: BLE001 - this shard stays as it was; the others go on
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


MODEL_ERROR_NAMES = ("CheckpointError", "CorruptCheckpointError", "CheckpointNotFoundError", "MissingKeyError",
                     "ShapeMismatchError", "UnexpectedKeyError", "UnknownFormatError", "TokenizerError")


def verify_model(spec) -> None:
  """Reads every tensor of the checkpoint once (CRC checked for .npz), one at a time: a corrupt file fails
  here, before Ray, instead of in every actor."""
  from pgbatch import checkpoints
  try:
    with checkpoints.open_checkpoint(spec.model.checkpoint, variant=spec.model.variant) as ckpt:
      for _ in ckpt.tensors():
        pass
  except (checkpoints.CheckpointError, OSError) as e:
    raise checkpoints.CheckpointError(f"model.checkpoint: {e}") from None


@dataclasses.dataclass
class RunOptions:
  """`pgbatch run` flags: what to redo beyond the uncommitted shards, and whether to take a held output."""
  retry_errors: bool = False    # re-annotate the error rows of committed shards
  redo_changed: bool = False    # redo committed shards whose input object changed since commit
  force: bool = False           # take the output lease from a run that still looks alive


def run(spec, progress: bool = True, stream=None, options: Optional[RunOptions] = None) -> Summary:
  """Runs the job; never raises for bad data. Raises, before any work: `InputError` (no input, wrong image
  column), `errors.OutputError` (output not usable or writable), `lease.LeaseHeld` (another run holds the
  output), `CheckpointError` / `TokenizerError` / `FileNotFoundError` (the model), `SafetyListError`."""
  from pgbatch.io import lease, readers, resume, sink as sink_lib
  from pgbatch.io.listing import check_output, list_inputs
  from pgbatch.redact import redact_uri
  options = options or RunOptions()
  start = time.monotonic()
  started_at = datetime.datetime.now(datetime.timezone.utc)
  run_id = started_at.strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]
  summary = Summary(job=spec.name, run_id=run_id, output_uri=redact_uri(spec.output.uri))
  in_opts, out_opts = dict(spec.input.storage_options) or None, dict(spec.output.storage_options) or None
  shards = list_inputs(spec.input)
  if spec.input.format == "parquet":
    readers.check_parquet_input(shards[0], spec.input.image_column, in_opts)
  check_output(spec.output.uri, out_opts)
  sink = sink_lib.Sink(spec.output.uri, spec.output_schema(), storage_options=out_opts, job=spec.name)
  sink.probe_writable()
  with lease.hold(sink.fs, sink.root, run_id, spec.name, force=options.force) as held:
    removed = sink.cleanup()
    if removed:
      log.warning("removed %d leftover file(s) of an interrupted run: %s", len(removed), ", ".join(removed[:5]))
    committed = sink.committed()
    work = resume.plan(spec.input.format, shards, committed, spec.input.files_per_shard,
                       retry_errors=options.retry_errors, redo_changed=options.redo_changed,
                       storage_options=out_opts)
    summary.changed = [sid for sid, _ in work.changed]
    for sid, fields in work.changed:
      log.warning("input changed since its commit (%s): %s%s", ", ".join(fields), sid,
                  "; redoing it" if options.redo_changed else "; rerun with --redo-changed to redo it")
    summary.shards_total, summary.shards_skipped = work.done + len(work.todo), work.done
    if work.todo:
      _execute(spec, sink, work, summary, started_at, held, progress, stream, start)
  summary.seconds = time.monotonic() - start
  return summary


def _execute(spec, sink, work, summary: Summary, started_at, held, progress: bool, stream, start: float) -> None:
  """Model preflight (headers, then every tensor), then the Ray Data plan over `work.todo` and the commits."""
  info = plan_info(spec)
  verify_model(spec)
  log.info("%d shard(s) to do, %d already committed; model %s", len(work.todo), work.done, info["model_variant"])
  bar = Progress(len(work.todo), enabled=progress, stream=stream, started=start)
  bar.phase(PHASES[1])
  try:
    inherited = _start_ray(spec, start)
    items = [{"id": s.id, "uris": list(s.uris), "skip": list(work.skip_keys.get(s.id, []))} for s in work.todo]
    ds = plan_lib.build_dataset(spec, items, info, _provenance(spec, info, summary.run_id, started_at),
                                inherited_env=inherited)
  except BaseException:
    bar.cancel()
    raise
  bar.phase(PHASES[2])
  buf, committed_ids = commit_lib.ShardBuffer(), set()
  try:
    _commit_loop(ds, spec, sink, info, summary, bar, start, buf, committed_ids, work, held)
  except Exception as e:  # noqa: BLE001 - committed shards stay; the rest is redone by a rerun
    log.exception("pipeline failed")
    summary.failure = commit_lib.short_error(e)
    summary.model_error = any(name in str(e) for name in MODEL_ERROR_NAMES)
  finally:
    bar.close()
  summary.annotate_rate, summary.phases = bar.rate(), {k: v for k, v in bar.phases.items() if k in PHASES}
  summary.shards_failed = [s.id for s in work.todo if s.id not in committed_ids]
  if summary.shards_failed and summary.failure is None:
    reasons = "; ".join(f"{k}: {v}" for k, v in list(buf.broken.items())[:3])
    summary.failure = f"{len(summary.shards_failed)} shard(s) not written" + (f" ({reasons})" if reasons else "")
