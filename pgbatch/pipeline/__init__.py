"""The Ray Data pipeline: a JobSpec → typed Parquet, one file per input shard, resumable.

    summary = pipeline.run(config.load("job.yaml"))

Driver (this process): list shards → drop shards already committed in the output manifest → build the plan:

  from_items(one item per shard)                 one block per shard
  → flat_map(read)                               rows {key, shard, source_uri, image_bytes, metadata, status, …}
  → map_batches(decode + safety pre)             CPU tasks (fused): pixels uint8 [B, R, R, 3], width, height,
                                                 sha256; image filters may set status filtered/error
  → map_batches(AnnotatorActor)                  actor pool per `pgbatch.placement` around `pgbatch.annotate`:
                                                 each image encoded once for all tasks; typed task columns;
                                                 the full-batch programs compile in a thread at start-up
  → map_batches(SafetyPost)                      CPU actors: text filters, policy, `safety` column,
                                                 provenance.safety_filters; models load in a thread
  → driver iter_batches                          rows buffered per shard until all `shard_rows` arrived,
                                                 then `Sink.commit_shard` (atomic; manifest entry)

Every row read comes out exactly once: stages never drop rows (failures become status "error" with the
stage and reason), and a shard is written only when all of its rows arrived. A crash loses only the shards
not yet committed; a rerun redoes exactly those. The only package that imports `ray.data`.

Modules: `driver` (preflight → plan → commit loop: `run`), `plan` (the Ray Data stages, thin actors), `commit`
(per-shard assembly, commit with retry, output checks), `progress` (progress line, summary). Ray start-up and
local resource checks are in `pgbatch.placement`; the annotation of one batch in `pgbatch.annotate`.
"""
from pgbatch.pipeline.driver import RunOptions, SafetyListError, run
from pgbatch.pipeline.progress import Summary

__all__ = ["run", "RunOptions", "Summary", "SafetyListError"]
