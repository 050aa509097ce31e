"""`pgbatch validate JOB.yaml…`: check job specs without running them (no JAX, no Ray)."""
from __future__ import annotations

import sys

from pgbatch.cli.args import add_override_args

HELP = "check a job spec without running it"


def register(parser) -> None:
  parser.add_argument("jobs", nargs="+", metavar="JOB.yaml", help="job spec(s) to check")
  add_override_args(parser)
  parser.add_argument("--show", action="store_true", help="print the resolved spec (defaults filled in)")
  parser.add_argument("--inputs", action="store_true",
                      help="also list the input shards the glob matches (reads the bucket or folder listing)")
  parser.add_argument("--timeout", type=float, default=60.0, metavar="S",
                      help="with --inputs: give up listing after S seconds (default 60)")
  parser.epilog = ("Spec shape: name, input {uri, format, image_column, key_column, files_per_shard, "
                   "storage_options, allowed_sources}, "
                   "output {uri}, model {checkpoint, tokenizer, variant, dtype, vae}, tasks [{name, kind, ...}], "
                   "resources {accelerator, actors, chips_per_actor, batch_size, ...}, decode {max_pixels, "
                   "max_decoded_bytes, batch_size}, safety {...}. ${VAR} only in uris, storage_options, model paths. "
                   "Env overrides: PGBATCH__SECTION__FIELD=value.")


def main(args) -> int:
  from pgbatch.config import JobSpecError, load
  bad = 0
  for job in args.jobs:
    try:
      spec = load(job, args.overrides)
    except JobSpecError as e:
      print(str(e), file=sys.stderr)
      bad += 1
      continue
    kinds = ", ".join(f"{t.name} ({t.kind})" for t in spec.tasks)
    from pgbatch.redact import redact_uri
    print(f"{job}: ok — job {spec.name!r}, {spec.input.format} from {redact_uri(spec.input.uri)} → "
          f"{redact_uri(spec.output.uri)}; "
          f"tasks: {kinds}; {spec.resources.actors} {spec.resources.accelerator} actor(s)")
    if getattr(args, "inputs", False):
      from pgbatch.io import readers
      from pgbatch.io.listing import list_inputs
      try:
        shards = list_inputs(spec.input, timeout_s=args.timeout)
      except readers.InputError as e:
        print(f"{job}: input: {e}", file=sys.stderr)
        bad += 1
        continue
      print(f"  {len(shards)} input shard(s): " + ", ".join(s.id for s in shards[:3]) + (" …" if len(shards) > 3 else ""))
    if args.show:
      print(spec.to_yaml())
  return 2 if bad else 0  # 2: a bad spec or input (see pgbatch.errors)
