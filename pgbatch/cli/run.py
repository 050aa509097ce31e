"""`pgbatch run JOB.yaml`: run a job on Ray (local or the cluster this process is attached to)."""
from __future__ import annotations

import logging
import sys

from pgbatch.cli.args import add_override_args

HELP = "run a job spec"


def register(parser) -> None:
  parser.add_argument("job", metavar="JOB.yaml", help="job spec (local path or URL)")
  add_override_args(parser)
  parser.add_argument("--no-progress", action="store_true", help="no progress line on stderr")
  parser.add_argument("-v", "--verbose", action="store_true", help="log each committed shard and the run's phases")
  preview = parser.add_argument_group("preview (a few images into a separate folder; the job's output is not touched)")
  preview.add_argument("--limit", type=int, metavar="N", help="annotate only the first N images")
  preview.add_argument("--sample", type=float, metavar="FRACTION", help="annotate a seeded random sample")
  preview.add_argument("--seed", type=int, default=0, help="seed of --sample (default 0)")
  preview.add_argument("--preview-dir", metavar="DIR", help="default ./pgbatch-preview/<job name>/")
  parser.add_argument("--retry-errors", action="store_true",
                      help="also re-annotate the error rows of committed shards (each shard rewritten atomically)")
  parser.add_argument("--redo-changed", action="store_true",
                      help="also redo committed shards whose input file changed since their commit")
  parser.add_argument("--force", action="store_true",
                      help="take over the output from another run that holds it (only when that run is dead)")


def main(args) -> int:
  from pgbatch import config
  from pgbatch.io.readers import InputColumnError, InputError
  from pgbatch.pipeline import RunOptions, SafetyListError, run
  from pgbatch.placement import ResourceError
  if getattr(args, "verbose", False) and logging.getLogger("pgbatch").getEffectiveLevel() > logging.INFO:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("pgbatch").setLevel(logging.INFO)
  try:
    spec = config.load(args.job, args.overrides)
  except config.JobSpecError as e:
    print(str(e), file=sys.stderr)
    return 2
  from pgbatch.redact import install_log_filter
  install_log_filter(spec.secrets())
  preview = args.limit is not None or args.sample is not None
  if preview and not ((args.limit is None or args.limit >= 1) and (args.sample is None or 0 < args.sample <= 1)):
    print("pgbatch run: --limit must be >= 1 and --sample in (0, 1]", file=sys.stderr)
    return 2
  from pgbatch.checkpoints import CheckpointError
  from pgbatch.errors import OutputError, report
  from pgbatch.io.lease import LeaseHeld
  from pgbatch.tokenizer import TokenizerError
  options = RunOptions(retry_errors=args.retry_errors, redo_changed=args.redo_changed, force=args.force)
  try:
    if preview:
      from pgbatch import preview as preview_lib
      return preview_lib.run_preview(spec, args, run)
    summary = run(spec, progress=not args.no_progress, options=options)
  except InputColumnError as e:
    report(f"pgbatch run: {spec.name}", e)
    return 2
  except InputError as e:
    report(f"pgbatch run: {spec.name}: no input to process", e)
    return 2
  except (CheckpointError, TokenizerError, FileNotFoundError) as e:
    report(f"pgbatch run: {spec.name}: cannot load the model", e)
    return 2
  except (ResourceError, SafetyListError, OutputError, LeaseHeld) as e:
    report(f"pgbatch run: {spec.name}", e)
    return 2
  print(summary.line())
  if summary.phases:
    print("  " + summary.phases_line())
  if summary.reasons:
    print("  " + summary.reasons_line())
  if summary.changed and not options.redo_changed:
    more = ", …" if len(summary.changed) > 3 else ""
    print(f"pgbatch run: {spec.name}: WARNING: {len(summary.changed)} committed shard(s) changed in the input "
          f"since their commit ({', '.join(summary.changed[:3])}{more}); rerun with --redo-changed to redo them",
          file=sys.stderr)
  if summary.model_error:   # the checkpoint failed in the actors: a rerun would fail the same way
    print(f"pgbatch run: {spec.name}: cannot load the model: {summary.failure}", file=sys.stderr)
    return 2
  if not summary.success:
    print(f"pgbatch run: {spec.name}: {summary.failure}; {len(summary.shards_failed)} shard(s) not written "
          "(rerun the same command to resume: committed shards are skipped)", file=sys.stderr)
    return 1
  return 0
